"""Model families: what differs between SD 1.x, SD 2.x and SDXL (and, next, the DiT families) behind one small
interface, `base.Family`, one module per family (`sd1`, `sd2`, `sdxl`); `registry` knows them all.

Pure Python at import time (no torch, no diffusers): the planner and the request side read a family's constants,
the model loaders and the stages call its methods on loaded components. docs/ARCHITECTURE.md, "a model family".
"""
