"""An encoded image's (height, width) from its header, checked against a pixel budget before any
pixel is decoded: a few-KB 'decompression bomb' that declares 30000 x 30000 pixels is refused with
a one-line reason, never decoded.

    PNG   the 8-byte signature, then the IHDR chunk: its length and "IHDR" (bytes 8..16), then
          width and height as big-endian uint32 (bytes 16..24)
    JPEG  FF D8 FF, then marker segments up to the start of frame (SOFn), which holds height and
          width as uint16

`header_size` reads bytes in Python, with or without TensorFlow (predict.py's files). The served
graph reads the same fields with TensorFlow ops (`serving.export.header_size`: TF Serving runs no
Python); both take the layout, the refusals and the budget rule from here. No TensorFlow, no Keras.
"""

from keras_mixer.data.sources import JPEG_MAGIC, PNG_MAGIC

PNG_SIZE_OFFSET = 16  # width, then height: big-endian uint32 each
PNG_HEADER_BYTES = PNG_SIZE_OFFSET + 8
NOT_AN_IMAGE = "not a JPEG or PNG image"
TRUNCATED_PNG = "truncated PNG: no complete IHDR header"
OVER_BUDGET = "image of {}x{} pixels (width x height) is over the pixel budget of {} pixels"  # width, height, budget


def header_size(data):
    """(height, width) ints declared by the header of `data` (the bytes of a PNG or JPEG file),
    without decoding any pixel; ValueError with a one-line reason for anything else (a truncated
    PNG header, a JPEG whose markers end before its start of frame, another format)."""
    if data.startswith(PNG_MAGIC):
        if len(data) < PNG_HEADER_BYTES:
            raise ValueError(TRUNCATED_PNG)
        at = PNG_SIZE_OFFSET
        return int.from_bytes(data[at + 4 : at + 8], "big"), int.from_bytes(data[at : at + 4], "big")
    if data.startswith(JPEG_MAGIC):
        import io

        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"not a readable JPEG ({e})") from None
        return height, width
    raise ValueError(NOT_AN_IMAGE)


def within_budget(height, width, max_pixels):
    """Whether an image of height x width has pixels, and no more than `max_pixels` of them. Python
    ints give a bool; TensorFlow int64 scalars a bool tensor (the served graph's check)."""
    return (height > 0) & (width > 0) & (height * width <= max_pixels)


def check_budget(height, width, max_pixels):
    """ValueError with the one-line `OVER_BUDGET` reason unless `within_budget`."""
    if not within_budget(height, width, max_pixels):
        raise ValueError(OVER_BUDGET.format(width, height, max_pixels))
