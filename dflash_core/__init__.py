"""dflash-serve core: target runtime, DFlash drafter, speculative engine (no HTTP, no Ray).

Importing it changes nothing in the process: the CPU thread policy and dtype are chosen
by the entry points (`dflash_core.runtime`)."""
