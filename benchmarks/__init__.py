"""Speed and memory benchmarks of Tessera against plain diffusers, same process, same loaded components.

`python -m benchmarks --help` lists the options; README.md ("## Benchmarks") shows a table and explains each row;
benchmarks/NOTES.md records the GPU speed ideas with their predictions and how to measure them.
"""
