"""FP8 (E4M3) 3-D convolutions for the streaming Wan VAE decoder (issue 10); see README.md."""
