"""The VAE: encode/decode with fallbacks (`io`), the exact tiled VAE (`tiling`), and the per-layer stages
(`stages`) and streamed execution (`stream`) it is built from."""
