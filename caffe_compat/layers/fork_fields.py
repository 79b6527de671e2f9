"""Reading a fork's parameter message from a field number our schema gives to another field.

Two forks (or a fork and BVLC) sometimes gave one field number to different messages: PSPNet's
``interp_param`` at 143 is BVLC's ``input_param``; SegNet's ``upsample_param`` at 137 is BVLC's
``embed_param``; OpenCV's ``proposal_param`` at 201 is SSD's ``multibox_loss_param``. Our
caffe.proto keeps BVLC's (or the more common) meaning of such a number and gives the fork's
message another number (docs/layers.md, "Field numbers of the forks"). A text prototxt names
its fields, so this matters only for a binary ``NetParameter`` written by the other fork: there
the message arrives under the clashing number, parsed as the wrong message (or kept as an
unknown field). The fork layers then re-read it at set-up: when their own field is unset, they
take the payload of the clashing number on that layer (the layer's type tells which fork wrote
it) and parse it as their own message. Text in the payload that our schema parsed into the
other message's typed fields is re-serialized by protobuf, so it survives unless a value had to
change type (a varint 2 read into a ``bool`` comes back as 1; docs say where that can happen).
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

__all__ = ["fork_param", "field_payloads"]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def field_payloads(data: bytes, number: int) -> list[bytes]:
    """The payloads of every length-delimited field ``number`` in a serialized message."""
    out = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(data, pos)
            if field == number:
                out.append(data[pos : pos + n])
            pos += n
        else:
            raise DecodeError(f"wire type {wire} (groups) in a LayerParameter")
    return out


def fork_param(layer_param, name: str, alternative_numbers: tuple[int, ...] = ()):
    """``layer_param.<name>`` when set; else the same message parsed from the first of
    ``alternative_numbers`` present on the layer (another fork's number for it); else the unset
    field (its defaults)."""
    if layer_param.HasField(name) or not alternative_numbers:
        return getattr(layer_param, name)
    data = layer_param.SerializeToString()
    for number in alternative_numbers:
        payloads = field_payloads(data, number)
        if payloads:
            msg = type(getattr(layer_param, name))()
            for p in payloads:
                msg.MergeFromString(p)
            return msg
    return getattr(layer_param, name)
