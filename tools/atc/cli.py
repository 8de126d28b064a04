"""`flexnpu-atc`: ATC's command line for the emulated chips. It takes ATC's options (`--opt=value`, or
`--opt value`), converts an ONNX model and writes `<output>.om`:

    flexnpu-atc --model=resnet50.onnx --framework=5 --output=resnet50 --soc_version=Ascend910B2 \\
        --input_shape="images:-1,3,224,224" --dynamic_batch_size="1,2,4,8" --precision_mode=force_fp16
"""

from __future__ import annotations

from pathlib import Path

import click
import onnx
from google.protobuf.message import DecodeError

from interposer.shim.flexnpu_client import om
from npu.profiles import PROFILES
from tools.atc.convert import (
    DEFAULT_PRECISION,
    ConversionError,
    Options,
    convert,
    parse_batches,
    parse_input_shape,
)

ONNX_FRAMEWORK = 5
FRAMEWORKS = {0: "Caffe", 1: "MindSpore", 3: "TensorFlow", 5: "ONNX"}  # ATC's --framework codes
SOCS = {p.soc: name for name, p in PROFILES.items()}  # --soc_version -> the emulated chip


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", required=True, help="The ONNX model file.")
@click.option("--framework", required=True, type=int, help="The source framework; 5 (ONNX) is the one supported.")
@click.option("--output", required=True, help="Where to write the model: <output>.om.")
@click.option("--soc_version", required=True, help=f"The chip the model runs on: {', '.join(SOCS)}.")
@click.option("--input_shape", help='Input shapes, "name:d0,d1,...;name2:...", -1 for the batch of the gears.')
@click.option("--input_format", help="Layout of the inputs: NCHW (default for 4-D inputs), ND or NCDHW.")
@click.option(
    "--precision_mode",
    default=DEFAULT_PRECISION,
    show_default=True,
    help="force_fp16, allow_fp32_to_fp16, force_fp32 or must_keep_origin_dtype.",
)
@click.option("--dynamic_batch_size", help='Batch sizes of the gears, e.g. "1,2,4,8".')
def main(model_path, framework, output, soc_version, input_shape, input_format, precision_mode, dynamic_batch_size):
    """Convert an ONNX model to a FlexNPU offline model (.om), as CANN's ATC does for a real NPU."""
    click.echo("ATC start working now, please wait for a moment.")
    try:
        if framework != ONNX_FRAMEWORK:
            known = FRAMEWORKS.get(framework, "unknown")
            raise ConversionError(
                f"--framework={framework} ({known}) is not supported: flexnpu-atc converts ONNX models, --framework=5"
            )
        if soc_version not in SOCS:
            raise ConversionError(f"--soc_version={soc_version} is not an emulated chip (have {', '.join(SOCS)})")
        options = Options(
            soc=soc_version,
            input_shapes=parse_input_shape(input_shape) if input_shape else None,
            input_format=input_format,
            precision_mode=precision_mode,
            dynamic_batch=parse_batches(dynamic_batch_size) if dynamic_batch_size else (),
        )
        try:
            model = onnx.load(model_path)
        except OSError as exc:
            raise ConversionError(f"cannot read the ONNX model {model_path}: {exc.strerror}") from None
        except DecodeError as exc:
            raise ConversionError(f"{model_path} is not an ONNX model (protobuf: {exc})") from None
        converted = convert(model, options)
        path = Path(output.removesuffix(".om") + ".om")
        try:
            path.write_bytes(om.dumps(converted))
        except OSError as exc:
            raise ConversionError(f"cannot write {path}: {exc.strerror}") from None
    except ConversionError as exc:
        click.echo(f"ATC run failed: {exc}", err=True)
        raise SystemExit(1) from None
    gears = ", ".join(str(g.batch) for g in converted.graphs) if options.dynamic_batch else "static"
    nodes = sum(len(g.nodes) for g in converted.graphs)
    click.echo(f"{path}: {nodes} ops, gears {gears}, {len(converted.blob)} bytes of weights ({precision_mode})")
    click.echo("ATC run success, welcome to the next use.")


if __name__ == "__main__":
    main()
