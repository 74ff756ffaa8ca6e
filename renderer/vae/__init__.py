"""The exact VAE over bands and row strips: GroupNorm moments, the VAE modes, a strip's encode and decode."""
