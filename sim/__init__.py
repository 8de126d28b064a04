"""The virtual-time simulator: the real policies, engine, timing model, op cost functions, batching core and model
description, with no daemon and no processes, for experiments larger than this machine."""
