"""Live interactive viewer: `longlive serve` streams chunks to a web page and takes prompt switches mid-stream."""
