"""flexnpu-atc: CANN's ATC for the emulated chips. An ONNX model is folded and lowered to CANN ops (convert.py,
lower.py) and written as a FlexNPU offline model (interposer/shim/flexnpu_client/om.py, docs/om-format.md) that
acl.mdl loads and runs. The command line is cli.py."""
