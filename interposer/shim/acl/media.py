"""acl.media: DVPP (image and video processing). Device memory for DVPP is ordinary device memory here; the
processing calls are refused with ACL_ERROR_FEATURE_UNSUPPORTED until DVPP is emulated."""

from __future__ import annotations

from acl._ret import code, refused, value
from flexnpu_client.codec import Op
from flexnpu_client.runtime import RUNTIME


@value(0)
def dvpp_malloc(size: int) -> int:
    """acldvppMalloc: device memory DVPP can read and write."""
    return RUNTIME.malloc(size, 0)


@code
def dvpp_free(dev_ptr: int) -> None:
    RUNTIME.call(Op.FREE, ptr=dev_ptr)


@refused()
def dvpp_create_channel(channel_desc: int) -> None:
    """DVPP is not emulated by FlexNPU (no VPC, JPEGD/JPEGE, VDEC or VENC)."""


@refused()
def dvpp_destroy_channel(channel_desc: int) -> None:
    """DVPP is not emulated by FlexNPU."""


@refused()
def dvpp_vpc_resize_async(channel_desc, input_desc, output_desc, resize_config, stream) -> None:
    """DVPP is not emulated by FlexNPU (VPC resize)."""


@refused()
def dvpp_vpc_crop_async(channel_desc, input_desc, output_desc, crop_area, stream) -> None:
    """DVPP is not emulated by FlexNPU (VPC crop)."""


@refused()
def dvpp_vpc_crop_and_paste_async(channel_desc, input_desc, output_desc, crop_area, paste_area, stream) -> None:
    """DVPP is not emulated by FlexNPU (VPC crop and paste)."""


@refused()
def dvpp_vpc_convert_color_async(channel_desc, input_desc, output_desc, stream) -> None:
    """DVPP is not emulated by FlexNPU (VPC colour conversion)."""


@refused()
def dvpp_jpeg_decode_async(channel_desc, data, size, output_desc, stream) -> None:
    """DVPP is not emulated by FlexNPU (JPEG decoding)."""


@refused()
def dvpp_jpeg_encode_async(channel_desc, input_desc, data, size, config, stream) -> None:
    """DVPP is not emulated by FlexNPU (JPEG encoding)."""


@refused(0, 0, 0)
def dvpp_jpeg_get_image_info(data: int, size: int) -> None:
    """DVPP is not emulated by FlexNPU (JPEG header parsing)."""
