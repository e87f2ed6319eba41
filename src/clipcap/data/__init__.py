"""Data: sources of captioned images, the manifest, image loading and validation."""
