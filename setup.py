"""megatron_longlive: train and serve real-time, minute-long, multi-shot AR video generators."""
from setuptools import find_packages, setup

setup(
    name="megatron_longlive",
    version="0.1.0",
    description="Balanced-SP + NVFP4 infrastructure for long autoregressive video diffusion (Wan-family DiTs)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longlive*", "dataloaders*", "tools*"]),
    include_package_data=True,
    package_data={"megatron_longlive.launch": ["templates/*"]},
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.16",
        "zarr>=3.1,<4",
        "numcodecs",
        "pyyaml",
        "wandb",
        "safetensors",
        "diffusers>=0.35",
        "transformers>=4.50",
        "peft>=0.15",
        "sentencepiece",
        "av>=12",
        "imageio>=2.30",
        "imageio-ffmpeg",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout"],
        "gpu": ["triton>=3.2", "transformer-engine[pytorch]", "nvidia-dali-cuda120"],
        "triton": ["triton==3.6.0"],
        "mpi": ["mpi4py"],
    },
    entry_points={"console_scripts": ["longlive=megatron_longlive.cli.main:main"]},
)
