"""dflash-serve core: target runtime, DFlash drafter, speculative engine (no HTTP, no Ray)."""
import os as _os

# OpenMP threads that spin at barriers collapse when another busy process shares the
# cores (a served engine next to Ray workers, tests next to a server): a 64x64 matmul
# went from 0.01 ms to 15 ms here. Sleeping waiters cost little and avoid that. Must be
# set before torch starts OpenMP; an explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
