"""unclip: unCLIP (DALL-E 2) as Unix-style command-line stages."""

__version__ = "0.1.0"
