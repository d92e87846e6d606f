"""corral: supervise AI-agent workers in Docker containers. The public API."""
