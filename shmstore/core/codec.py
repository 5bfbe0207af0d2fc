"""msgpack encoding of user state, with extension types for the values JSON lacks.

Plain values use msgpack's own types: None, bool, int (64-bit signed or unsigned), float
(nan and inf too), str, bytes (bytearray and memoryview are written as bytes), list and
dict (any encodable hashable value as key).  Subclasses of dict, list, str, int and float
(``OrderedDict``, ``IntEnum`` ...) are written as their base type, tuple and set subclasses
(``namedtuple`` ...) as tuple and set.

Everything else travels as a msgpack ext value whose payload is itself msgpack, packed
with ``use_bin_type=True``.  The codes are a wire format shared by several backends and
never change meaning; a new type gets a new code.

====  ===========  ===========================================================
code  type         payload
====  ===========  ===========================================================
1     tuple        array of the items
2     set          array of the members, in iteration order
3     frozenset    array of the members, in iteration order
4     datetime     ``[us]`` naive, ``[us, offset_us]`` aware: ``us`` is the wall-clock
                   time in microseconds since 1970-01-01T00:00 (negative before),
                   ``offset_us`` is ``utcoffset()`` in microseconds; aware values
                   come back with a fixed-offset ``datetime.timezone``
5     date         ``[days]``: days since 1970-01-01 (negative before)
6     time         ``[us]`` naive, ``[us, offset_us]`` aware: ``us`` is microseconds
                   since midnight
7     timedelta    ``[days, seconds, microseconds]`` as normalised by ``timedelta``
8     Decimal      ``[str(value)]``, which is exact, NaN and Infinity included
9     UUID         ``[bin 16]``, the 16 bytes of ``UUID.bytes``
10    ndarray      ``[dtype, shape, data]``: ``dtype.str`` (``'<f8'``, ``'|S5'`` ...;
                   kinds ``biufcSUmMV`` only, ``V`` unstructured), shape as an array
                   of ints, and the items in C order as bin
11    numpy        ``[dtype, data]``: one numpy scalar (``numpy.int8(3)``,
      scalar       ``numpy.datetime64(1, 'ns')`` ...), which comes back as the same
                   type and value: ``dtype.str`` as for ndarray, and ``data`` the
                   scalar's bytes as bin (``tobytes()``), except for ``str_`` (the
                   str) and ``bytes_`` (the bytes), whose trailing NULs numpy's
                   buffer would drop
12    ndarray      ``[dtype, shape, offset]``: only inside a split encoding (below):
      ref          the items, in C order, are at ``offset`` (a multiple of the page
                   size) in the encoding's data area
====  ===========  ===========================================================

A *split encoding* (`MsgpackCodec.encode_split`) is what the shared-memory data plane
writes into a sealed memory file: a 24-byte header (``SPLIT_MAGIC``, the skeleton's
length and the data area's offset, little-endian u64s), the skeleton (msgpack as above,
with large arrays as code 12 references), then the arrays' items, each at a page-aligned
offset, so that a reader maps the file and gets numpy arrays that are views of its
pages.  The magic starts with 0xc1, a byte msgpack never writes, so a split encoding is
never taken for a plain one; `MsgpackCodec.decode` reads both.

numpy scalars and arrays of every fixed-size dtype round-trip exactly, datetime64 and
timedelta64 with their unit (NaT too); ``longdouble`` and ``clongdouble`` are this
platform's bytes (x87 padding zeroed in scalars), so read them on a platform with the
same long double format.  A
structured value (``numpy.void`` with fields, structured or object arrays) raises
`EncodeError`: convert it with ``.item()``, ``.tolist()`` or ``numpy.asarray(...)``.

``datetime.fold`` is not kept, and a ``time`` whose ``utcoffset()`` is None (a zone
that needs a date) is written as naive.  Code -1, msgpack's standard timestamp, is
never written; when read it becomes an aware UTC datetime.

Tuples, sets and frozensets may nest at most ``8`` deep inside one another (lists and
dicts in between do not count): each level packs its payload with a fresh msgpack call
on the C stack, and the bound keeps both directions far from overflowing it.
"""

from __future__ import annotations

import mmap
import re
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from math import prod
from types import EllipsisType
from typing import Any
from uuid import UUID

import msgpack

from .errors import ConfigError, DecodeError, EncodeError

__all__ = ["DEFAULT_CODEC", "DEFAULT_MAX_BYTES", "EMPTY_MAP", "MsgpackCodec", "SPLIT_MAGIC",
           "Split", "is_split"]

DEFAULT_MAX_BYTES: int = 64 * 1024 * 1024
EMPTY_MAP: bytes = b"\x80"

EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_DATETIME = 4
EXT_DATE = 5
EXT_TIME = 6
EXT_TIMEDELTA = 7
EXT_DECIMAL = 8
EXT_UUID = 9
EXT_NDARRAY = 10
EXT_NUMPY_SCALAR = 11
EXT_NDARRAY_REF = 12

SPLIT_MAGIC = b"\xc1SHMSEG\x01"
_SPLIT_HEAD = struct.Struct("<8sQQ")
PAGE = mmap.PAGESIZE
# Per thread: while `encode_split` runs, what it takes out of line (``out``: the smallest
# size it takes, an int, until it takes an array, then an `_OutOfLine`; None otherwise:
# nothing is made for a state without a large array, on every save); while a split
# encoding is decoded, its data area (``data``) and whether arrays are copied out of it
# (``copy``).
_split = threading.local()


class _OutOfLine:
    """One `encode_split` call's arrays taken out of line: ``(offset, array)`` pairs, the
    smallest size it takes (``above``) and the data area's end so far (``end``)."""

    __slots__ = ("above", "arrays", "end")

    def __init__(self, above: int) -> None:
        self.above = above
        self.arrays: list[tuple[int, Any]] = []
        self.end = 0

_MAX_EXT_DEPTH = 8
# Only used to point at the offending value after a failure: the C packer refuses values
# nested more than 1024 deep, the pure-Python fallback more than 511.
_NEST_LIMIT = 511 if msgpack.Packer.__module__ == "msgpack.fallback" else 1024
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_packb = msgpack.packb
_unpackb = msgpack.unpackb
_ExtType = msgpack.ExtType

_EPOCH = datetime(1970, 1, 1)
_EPOCH_ORDINAL = _EPOCH.toordinal()
_ONE_US = timedelta(microseconds=1)
_US_PER_DAY = 86_400_000_000
_NDARRAY_KINDS = frozenset("biufcSUmMV")
_DTYPE_RE = re.compile(r"[<>|=][biufcSUmMV][0-9]{1,9}(?:\[[0-9]{0,9}[A-Za-z]{1,3}\])?")
_SUPPORTED = (
    "None, bool, int, float, str, bytes, list, dict, tuple, set, frozenset, datetime, "
    "date, time, timedelta, Decimal, UUID, a numpy scalar or a numpy array"
)
_PACK_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, BufferError)

_Hook = Callable[[Any], Any]


def _type_name(obj: object) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- encoding


def _pack_parts(code: int, parts: list[Any]) -> Any:
    return _ExtType(code, _packb(parts, use_bin_type=True))


def _enc_datetime(value: datetime) -> Any:
    us = (
        (value.toordinal() - _EPOCH_ORDINAL) * 86_400
        + value.hour * 3600
        + value.minute * 60
        + value.second
    ) * 1_000_000 + value.microsecond
    offset = value.utcoffset()
    return _pack_parts(EXT_DATETIME, [us] if offset is None else [us, offset // _ONE_US])


def _enc_date(value: date) -> Any:
    return _pack_parts(EXT_DATE, [value.toordinal() - _EPOCH_ORDINAL])


def _enc_time(value: time) -> Any:
    us = (value.hour * 3600 + value.minute * 60 + value.second) * 1_000_000 + value.microsecond
    offset = value.utcoffset()
    return _pack_parts(EXT_TIME, [us] if offset is None else [us, offset // _ONE_US])


def _enc_timedelta(value: timedelta) -> Any:
    return _pack_parts(EXT_TIMEDELTA, [value.days, value.seconds, value.microseconds])


def _enc_decimal(value: Decimal) -> Any:
    return _pack_parts(EXT_DECIMAL, [Decimal.__str__(value)])


def _enc_uuid(value: UUID) -> Any:
    return _pack_parts(EXT_UUID, [value.bytes])


def _plain_dtype(dtype: Any) -> bool:
    """Whether the extensions carry ``dtype``: a kind they know, no fields, no subarray."""
    return dtype.kind in _NDARRAY_KINDS and dtype.fields is None and dtype.subdtype is None


def _enc_ndarray(array: Any) -> Any:
    dtype = array.dtype
    if not _plain_dtype(dtype) or dtype.itemsize == 0:
        raise TypeError(
            f"numpy arrays of dtype {dtype} cannot be encoded (only bool, numeric, "
            "datetime64/timedelta64, fixed-width string and unstructured void dtypes; "
            "object arrays would need pickle, which is never used); convert it with "
            ".astype(...) or .tolist()"
        )
    out: _OutOfLine | int | None = getattr(_split, "out", None)
    if type(out) is int and array.nbytes >= out:
        out = _split.out = _OutOfLine(out)
    if type(out) is _OutOfLine and array.nbytes >= out.above:
        offset = -(-out.end // PAGE) * PAGE
        out.end = offset + array.nbytes
        out.arrays.append((offset, array))
        return _pack_parts(EXT_NDARRAY_REF, [dtype.str, list(array.shape), offset])
    return _pack_parts(EXT_NDARRAY, [dtype.str, list(array.shape), array.tobytes()])


def _enc_numpy_scalar(value: Any) -> Any:
    dtype = value.dtype
    if not _plain_dtype(dtype):
        raise TypeError(
            f"numpy scalars of dtype {dtype} cannot be encoded (structured or object "
            "values would lose their fields or need pickle); convert it with .item() "
            "or numpy.asarray(...).tolist()"
        )
    kind = dtype.kind
    if kind == "U":
        data: Any = str.__str__(value)
    elif kind == "S":
        data = bytes(value)
    else:
        data = value.tobytes()
        if dtype.char in "gG":
            data = _x87_canonical(data, dtype)
    return _pack_parts(EXT_NUMPY_SCALAR, [dtype.str, data])


def _x87_canonical(data: bytes, dtype: Any) -> bytes:
    """``data`` with the padding of x87 long doubles zeroed.

    An 80-bit x87 value is stored in 12 or 16 bytes; the rest is whatever memory held, so
    one value could otherwise have many encodings (and metadata filters compare bytes).
    """
    import numpy

    part = dtype.itemsize // (2 if dtype.kind == "c" else 1)
    if numpy.finfo(numpy.longdouble).nmant != 63 or part <= 10 or dtype.byteorder == ">":
        return data
    return b"".join(data[i:i + 10] + bytes(part - 10) for i in range(0, len(data), part))


_LEAF_ENCODERS: dict[type, Callable[[Any], Any]] = {
    datetime: _enc_datetime,
    date: _enc_date,
    time: _enc_time,
    timedelta: _enc_timedelta,
    Decimal: _enc_decimal,
    UUID: _enc_uuid,
}
_CONTAINER_CODES: dict[type, int] = {tuple: EXT_TUPLE, set: EXT_SET, frozenset: EXT_FROZENSET}
# Most derived first, so a datetime subclass is not taken for a date.
_LEAF_BASES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (datetime, _enc_datetime),
    (date, _enc_date),
    (time, _enc_time),
    (timedelta, _enc_timedelta),
    (Decimal, _enc_decimal),
    (UUID, _enc_uuid),
)


def _convert_other(obj: Any, hook: _Hook) -> Any:
    """Return a packable stand-in for anything not handled by type lookup, or raise."""
    if type(obj).__module__ == "numpy":
        import numpy

        if isinstance(obj, numpy.ndarray):
            return _enc_ndarray(obj)
        if isinstance(obj, numpy.generic):
            return _enc_numpy_scalar(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):
        return int.__int__(obj)
    if isinstance(obj, float):
        return float.__float__(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, tuple):
        return hook(tuple(obj))
    if isinstance(obj, frozenset):
        return hook(frozenset(obj))
    if isinstance(obj, set):
        return hook(set(obj))
    for base, encoder in _LEAF_BASES:
        if isinstance(obj, base):
            return encoder(obj)
    raise TypeError(f"unsupported type; convert it to a supported type: {_SUPPORTED}")


def _make_encode_hook(nested: _Hook | None) -> _Hook:
    def hook(obj: Any) -> Any:
        encoder = _LEAF_ENCODERS.get(type(obj))
        if encoder is not None:
            return encoder(obj)
        code = _CONTAINER_CODES.get(type(obj))
        if code is None:
            return _convert_other(obj, hook)
        if nested is None:
            raise ValueError(
                f"tuples, sets and frozensets nest more than {_MAX_EXT_DEPTH} deep; "
                "use lists for the deeper levels"
            )
        return _ExtType(
            code, _packb(list(obj), default=nested, strict_types=True, use_bin_type=True)
        )

    return hook


def _build_encode_hooks() -> list[_Hook]:
    hooks: list[_Hook] = [_make_encode_hook(None)]
    for _ in range(_MAX_EXT_DEPTH):
        hooks.append(_make_encode_hook(hooks[-1]))
    hooks.reverse()
    return hooks


# _ENCODE_HOOKS[n] is the hook for values inside n levels of tuples/sets.
_ENCODE_HOOKS = _build_encode_hooks()
_ENCODE_HOOK = _ENCODE_HOOKS[0]


# ---------------------------------------------------------------------------- locating
# A failed pack says what went wrong but not where; this walk repeats the packer's
# traversal (same order, same nesting rules) to name the first value it chokes on.

_Item = tuple[str, object, int, int]  # path, value, depth in its packb call, ext level


def _key_repr(key: object) -> str:
    try:
        text = repr(key)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{_type_name(key)}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _dict_children(value: dict[Any, Any], path: str, depth: int, level: int) -> Iterator[_Item]:
    for i, (key, item) in enumerate(value.items()):
        yield f"{path}.keys()[{i}]", key, depth, level
        yield f"{path}[{_key_repr(key)}]", item, depth, level


def _inspect(
    value: object, path: str, depth: int, level: int, on_path: dict[int, str]
) -> tuple[str | None, Iterator[_Item] | None]:
    """Return (why value cannot be packed, or None; its children, if a container)."""
    if depth > _NEST_LIMIT:
        return f"it is nested more than {_NEST_LIMIT} levels deep; flatten the structure", None
    if value is None or type(value) in (bool, float, bytes, bytearray):
        return None, None
    if id(value) in on_path:
        return (
            f"it is {on_path[id(value)]} again, which contains it (a cycle); break the cycle, "
            "for example by storing an id instead of the object",
            None,
        )
    if isinstance(value, int):
        number = int.__int__(value)
        if _INT_MIN <= number <= _INT_MAX:
            return None, None
        return (
            f"it needs {number.bit_length()} bits, outside the 64-bit range "
            "[-2**63, 2**64 - 1]; store it as a str or Decimal instead",
            None,
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"it is not valid UTF-8 ({exc.reason} at index {exc.start}); "
                "remove the lone surrogates or store it as bytes",
                None,
            )
        return None, None
    if isinstance(value, dict):
        return None, _dict_children(value, path, depth + 1, level)
    if isinstance(value, list):
        return None, ((f"{path}[{i}]", v, depth + 1, level) for i, v in enumerate(value))
    if isinstance(value, (tuple, set, frozenset)):
        if level >= _MAX_EXT_DEPTH:
            return (
                f"tuples, sets and frozensets nest more than {_MAX_EXT_DEPTH} deep here; "
                "use lists for the deeper levels",
                None,
            )
        if isinstance(value, tuple):
            return None, ((f"{path}[{i}]", v, 1, level + 1) for i, v in enumerate(value))
        return None, ((f"{path}{{{i}}}", v, 1, level + 1) for i, v in enumerate(value))
    try:
        _packb(value, default=_ENCODE_HOOKS[level], strict_types=True, use_bin_type=True)
    except BufferError as exc:
        return f"{exc}; pass bytes(...) of it instead", None
    except _PACK_ERRORS as exc:
        return str(exc) or type(exc).__name__, None
    return None, None


def _locate_failure(obj: object, root: str, error: BaseException) -> EncodeError:
    """Build the EncodeError for the first value of ``obj`` that cannot be packed."""
    on_path: dict[int, str] = {}
    stack: list[tuple[Iterator[_Item], int]] = []
    item: _Item | None = (root, obj, 0, 0)
    while item is not None:
        path, value, depth, level = item
        problem, children = _inspect(value, path, depth, level, on_path)
        if problem is not None:
            type_name = _type_name(value)
            return EncodeError(
                f"cannot encode {type_name} at {path}: {problem}",
                path=path,
                type_name=type_name,
            )
        if children is not None:
            on_path[id(value)] = path
            stack.append((children, id(value)))
        item = None
        while stack:
            item = next(stack[-1][0], None)
            if item is not None:
                break
            del on_path[stack.pop()[1]]
    type_name = _type_name(obj)
    return EncodeError(
        f"cannot encode {type_name} at {root}: {error or type(error).__name__}",
        path=root,
        type_name=type_name,
    )


# ---------------------------------------------------------------------------- decoding


def _parts(value: Any, lengths: tuple[int, ...]) -> list[Any]:
    if type(value) is not list or len(value) not in lengths:
        raise ValueError(f"expected an array of {' or '.join(map(str, lengths))} items")
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"expected an int, got {_type_name(value)}")
    return value


def _offset(value: Any) -> timezone:
    return timezone(timedelta(microseconds=_int(value)))


def _dec_datetime(value: Any) -> datetime:
    parts = _parts(value, (1, 2))
    result = _EPOCH + timedelta(microseconds=_int(parts[0]))
    return result if len(parts) == 1 else result.replace(tzinfo=_offset(parts[1]))


def _dec_date(value: Any) -> date:
    return date.fromordinal(_EPOCH_ORDINAL + _int(_parts(value, (1,))[0]))


def _dec_time(value: Any) -> time:
    parts = _parts(value, (1, 2))
    us = _int(parts[0])
    if not 0 <= us < _US_PER_DAY:
        raise ValueError(f"{us} microseconds is not a time of day")
    seconds, micro = divmod(us, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    tzinfo = None if len(parts) == 1 else _offset(parts[1])
    return time(hour, minute, second, micro, tzinfo)


def _dec_timedelta(value: Any) -> timedelta:
    days, seconds, micro = (_int(part) for part in _parts(value, (3,)))
    return timedelta(days=days, seconds=seconds, microseconds=micro)


def _dec_decimal(value: Any) -> Decimal:
    text = _parts(value, (1,))[0]
    if type(text) is not str:
        raise ValueError(f"expected a str, got {_type_name(text)}")
    return Decimal(text)


def _dec_uuid(value: Any) -> UUID:
    raw = _parts(value, (1,))[0]
    if type(raw) is not bytes or len(raw) != 16:
        raise ValueError("expected 16 bytes")
    return UUID(bytes=raw)


def _numpy(what: str) -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise DecodeError(f"the payload holds a numpy {what}; install numpy to decode it") \
            from exc
    return numpy


def _dtype(numpy: Any, dtype_str: Any, empty: bool) -> Any:
    """The dtype ``dtype_str`` names, if the extensions carry it (itemsize 0 if ``empty``)."""
    if type(dtype_str) is not str or not _DTYPE_RE.fullmatch(dtype_str):
        raise ValueError(f"bad dtype {dtype_str!r}")
    dtype = numpy.dtype(dtype_str)
    # Only the spelling encode writes (dtype.str), so one value has one encoding.
    if dtype.str != dtype_str or not _plain_dtype(dtype) or (dtype.itemsize == 0 and not empty):
        raise ValueError(f"bad dtype {dtype_str!r}")
    return dtype


def _dec_numpy_scalar(value: Any) -> Any:
    numpy = _numpy("scalar")
    dtype_str, data = _parts(value, (2,))
    dtype = _dtype(numpy, dtype_str, empty=True)
    kind = dtype.kind
    if kind == "U":
        if type(data) is not str:
            raise ValueError(f"expected a str, got {_type_name(data)}")
        result = numpy.str_(data)
    elif type(data) is not bytes:
        raise ValueError(f"expected bin data, got {_type_name(data)}")
    elif kind == "S":
        result = numpy.bytes_(data)
    elif len(data) != dtype.itemsize:
        raise ValueError(f"{len(data)} bytes of data, but dtype {dtype_str} needs "
                         f"{dtype.itemsize}")
    elif kind == "b" and data not in (b"\0", b"\1"):
        raise ValueError(f"{data!r} is not a bool")
    elif kind == "V":
        result = numpy.void(data)
    else:
        result = numpy.frombuffer(data, dtype=dtype)[0]
    if result.dtype != dtype:
        raise ValueError(f"dtype {dtype_str} does not fit its data")
    return result


def _shape(shape: Any) -> list[int]:
    if (
        type(shape) is not list
        or len(shape) > 64
        or any(type(n) is not int or n < 0 for n in shape)
    ):
        raise ValueError(f"bad shape {shape!r}")
    return shape


def _dec_ndarray(value: Any) -> Any:
    numpy = _numpy("array")
    dtype_str, shape, data = _parts(value, (3,))
    dtype = _dtype(numpy, dtype_str, empty=False)
    shape = _shape(shape)
    if type(data) is not bytes:
        raise ValueError(f"expected bin data, got {_type_name(data)}")
    needed = prod(shape) * dtype.itemsize
    if needed != len(data):
        raise ValueError(
            f"{len(data)} bytes of data, but dtype {dtype_str} and shape {tuple(shape)} "
            f"need {needed}"
        )
    # bytearray: the array must be writable, and bytes are not
    return numpy.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _dec_ndarray_ref(value: Any) -> Any:
    numpy = _numpy("array")
    dtype_str, shape, offset = _parts(value, (3,))
    area = getattr(_split, "data", None)
    if area is None:
        raise ValueError("an array stored out of line, outside a split encoding")
    dtype = _dtype(numpy, dtype_str, empty=False)
    shape = _shape(shape)
    count = prod(shape)
    needed = count * dtype.itemsize
    if type(offset) is not int or offset < 0 or offset % PAGE or offset + needed > len(area):
        raise ValueError(f"offset {offset!r} and {needed} bytes lie outside the data area "
                         f"of {len(area)} bytes")
    if not needed:
        return numpy.empty(shape, dtype=dtype)
    array = numpy.frombuffer(area, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array.copy() if _split.copy else array


_LEAF_DECODERS: dict[int, tuple[str, Callable[[Any], Any]]] = {
    EXT_DATETIME: ("datetime", _dec_datetime),
    EXT_DATE: ("date", _dec_date),
    EXT_TIME: ("time", _dec_time),
    EXT_TIMEDELTA: ("timedelta", _dec_timedelta),
    EXT_DECIMAL: ("Decimal", _dec_decimal),
    EXT_UUID: ("UUID", _dec_uuid),
    EXT_NDARRAY: ("ndarray", _dec_ndarray),
    EXT_NUMPY_SCALAR: ("numpy scalar", _dec_numpy_scalar),
    EXT_NDARRAY_REF: ("ndarray reference", _dec_ndarray_ref),
}
_CONTAINERS: dict[int, tuple[str, Callable[[list[Any]], Any]]] = {
    EXT_TUPLE: ("tuple", tuple),
    EXT_SET: ("set", set),
    EXT_FROZENSET: ("frozenset", frozenset),
}


def _make_decode_hook(nested: Callable[[int, bytes], Any] | None) -> Callable[[int, bytes], Any]:
    def hook(code: int, data: bytes) -> Any:
        container = _CONTAINERS.get(code)
        if container is not None:
            name, build = container
            if nested is None:
                raise DecodeError(
                    f"corrupt payload: {name} extension nested more than {_MAX_EXT_DEPTH} deep"
                )
            try:
                items = _unpackb(
                    data,
                    raw=False,
                    strict_map_key=False,
                    use_list=True,
                    ext_hook=nested,
                    timestamp=3,
                )
                if type(items) is not list:
                    raise ValueError(f"expected an array, got {_type_name(items)}")
                return build(items)
            except DecodeError:
                raise
            except Exception as exc:
                raise DecodeError(
                    f"corrupt payload: malformed {name} extension (code {code}): {exc}"
                ) from exc
        leaf = _LEAF_DECODERS.get(code)
        if leaf is None:
            raise DecodeError(
                f"corrupt payload: unknown extension type code {code}; it was written by a "
                "newer or foreign encoder"
            )
        name, decoder = leaf
        try:
            return decoder(_unpackb(data, raw=False, strict_map_key=False, use_list=True))
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(
                f"corrupt payload: malformed {name} extension (code {code}): {exc}"
            ) from exc

    return hook


def _build_decode_hooks() -> Callable[[int, bytes], Any]:
    hook = _make_decode_hook(None)
    for _ in range(_MAX_EXT_DEPTH):
        hook = _make_decode_hook(hook)
    return hook


_DECODE_HOOK = _build_decode_hooks()


# ---------------------------------------------------------------------------- the codec


class Split:
    """A split encoding, ready to be written: ``head`` at offset 0 (header and skeleton),
    then each of ``buffers`` at its offset; ``size`` bytes in all.

    ``buffers`` are ``(offset, raw)`` pairs: ``raw`` is a bytes-like view of an array's
    items (the caller's memory, not a copy), ``offset`` its place in the whole encoding.
    """

    __slots__ = ("buffers", "head", "size")

    def __init__(self, skeleton: bytes, arrays: list[tuple[int, Any]], end: int) -> None:
        start = _SPLIT_HEAD.size + len(skeleton)
        if arrays:
            start = -(-start // PAGE) * PAGE
        self.head = _SPLIT_HEAD.pack(SPLIT_MAGIC, len(skeleton), start) + skeleton
        self.buffers = [(start + offset, _raw(array)) for offset, array in arrays]
        self.size = start + end

    def __len__(self) -> int:
        return self.size

    def tobytes(self) -> bytes:
        """The whole encoding as one bytes object (what travels when no memory file can)."""
        out = bytearray(self.size)
        out[:len(self.head)] = self.head
        for offset, raw in self.buffers:
            out[offset:offset + len(raw)] = raw
        return bytes(out)


def _raw(array: Any) -> memoryview:
    """The items of ``array`` in C order as a flat bytes view (a copy only if it is not
    C-contiguous already)."""
    import numpy

    flat = numpy.ascontiguousarray(array).reshape(-1).view(numpy.uint8)
    view: memoryview = flat.data
    return view


def is_split(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts like a split encoding."""
    return bytes(memoryview(data)[:len(SPLIT_MAGIC)]) == SPLIT_MAGIC


class MsgpackCodec:
    """Encodes user state to msgpack bytes and back, with extension types.

    Inside a store, the size of a checkpoint is the store's business: its
    ``Limits.max_checkpoint_bytes`` (`StoreFull` before anything is sent; None: no limit)
    bounds what is saved, and what the store returns is decoded whatever its size (the
    store checked it when it was saved, possibly under a higher limit than today's, and
    the bytes are in this process already, so a bound would save no memory).  A codec
    made with an explicit ``max_bytes`` keeps that bound in every store too, on save
    (`EncodeError`) and on load (`DecodeError`): the stricter of it and the store's limit
    wins, because a bound set on purpose for this process (say, to keep its memory small)
    must hold, and a codec must never let a store hold more than the store allows.

    Parameters:
        max_bytes: the largest payload ``encode`` produces and ``decode`` accepts, in
            every store too.  None (the default): no bound of the codec's own; used on
            its own, the codec then bounds payloads at ``DEFAULT_MAX_BYTES`` (64 MiB).

    Attributes:
        max_bytes: the bound ``encode`` and ``decode`` apply when called on their own.
        own_max_bytes: the ``max_bytes`` given, or None; what stores apply.

    Raises:
        ConfigError: ``max_bytes`` is not a positive int or None.

    Example:
        >>> codec = MsgpackCodec()
        >>> codec.decode(codec.encode({"step": 3, "seen": (1, 2)}))
        {'step': 3, 'seen': (1, 2)}
    """

    name: str = "msgpack"

    def __init__(self, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
            raise ConfigError(
                f"max_bytes must be a positive int or None (no bound of the codec's own), "
                f"not {max_bytes!r}",
                option="max_bytes", value=repr(max_bytes)[:80],
            )
        self.own_max_bytes: int | None = max_bytes
        self.max_bytes: int = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes

    def __repr__(self) -> str:
        if self.own_max_bytes is None:
            return f"{type(self).__name__}()"
        return f"{type(self).__name__}(max_bytes={self.own_max_bytes})"

    def encode(
        self, obj: object, *, root: str = "state", max_bytes: int | EllipsisType | None = ...
    ) -> bytes:
        """Return the msgpack encoding of ``obj``.

        Parameters:
            obj: the value; see the module docstring for the supported types.
            root: the name ``obj`` goes by in error paths, e.g. ``"metadata"``.
            max_bytes: the bound for this call instead of the codec's ``max_bytes``
                (None: no bound); stores pass ``own_max_bytes``.

        Raises:
            EncodeError: a value cannot be encoded (``.path`` says where, e.g.
                ``state['rows'][3]['when']``, ``.type_name`` what), or the result is
                larger than the bound.
        """
        try:
            data: bytes = _packb(obj, default=_ENCODE_HOOK, strict_types=True, use_bin_type=True)
        except _PACK_ERRORS as exc:
            raise _locate_failure(obj, root, exc) from exc
        bound = self.max_bytes if max_bytes is ... else max_bytes
        if bound is not None and len(data) > bound:
            type_name = _type_name(obj)
            raise EncodeError(
                f"cannot encode {type_name} at {root}: it takes {len(data)} bytes, over the "
                f"codec's limit of {bound} bytes (max_bytes); store less, or make the "
                "codec with a larger MsgpackCodec(max_bytes=...) (None: the store's limit)",
                path=root,
                type_name=type_name,
            )
        return data

    def encode_split(self, obj: object, *, above: int,
                     max_bytes: int | EllipsisType | None = ...) -> bytes | Split:
        """Encode ``obj`` with every numpy array of at least ``above`` bytes out of line.

        Returns the plain encoding (bytes, the same as `encode`) when no array is that
        large, else a `Split` whose arrays are the caller's memory until it is written.
        ``max_bytes`` bounds the skeleton, as `encode` bounds an encoding.

        Raises:
            EncodeError: as `encode`.
        """
        if "numpy" not in sys.modules:  # then no array can be in it: the plain encoding
            return self.encode(obj, max_bytes=max_bytes)
        _split.out = above if above > 1 else 1
        try:
            data = self.encode(obj, max_bytes=max_bytes)
            out: _OutOfLine | int = _split.out
        finally:
            _split.out = None
        if isinstance(out, int):
            return data
        return Split(data, out.arrays, out.end)

    def decode(
        self, data: bytes | bytearray | memoryview, *, max_bytes: int | EllipsisType | None = ...,
        copy: bool = True,
    ) -> Any:
        """Return the value ``data`` encodes (a plain or a split encoding).

        Parameters:
            data: bytes from ``encode`` or ``encode_split`` (any bytes-like object).
            max_bytes: the bound for this call instead of the codec's ``max_bytes``
                (None: no bound); stores pass ``own_max_bytes``.
            copy: for a split encoding, whether its out-of-line arrays are copies (True:
                writable, independent of ``data``) or views of ``data`` (read-only if
                ``data`` is; they keep it alive).

        Raises:
            DecodeError: ``data`` is larger than the bound, corrupt, truncated, has
                trailing bytes, holds an unknown extension type, or holds a numpy value
                and numpy is not installed.
        """
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        bound = self.max_bytes if max_bytes is ... else max_bytes
        if bound is not None and size > bound:
            raise DecodeError(
                f"payload is {size} bytes, over the codec's limit of {bound} bytes "
                "(max_bytes); make the codec with a larger MsgpackCodec(max_bytes=...) "
                "(None: no bound of its own in a store)"
            )
        if data.startswith(SPLIT_MAGIC) if type(data) is bytes else is_split(data):
            return _decode_split(memoryview(data).cast("B"), copy)
        return _unpack(data, size)


def _unpack(data: bytes | bytearray | memoryview, size: int) -> Any:
    """A plain encoding's value; `DecodeError` for anything that is not one."""
    try:
        return _unpackb(
            data,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=_DECODE_HOOK,
            timestamp=3,
        )
    except (DecodeError, MemoryError):
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError(
            f"corrupt payload: {size - len(exc.extra)} bytes hold a complete value, "
            f"followed by {len(exc.extra)} extra bytes"
        ) from exc
    except Exception as exc:  # anything the unpacker throws means corrupt input
        detail = str(exc) or "not valid msgpack"
        raise DecodeError(
            f"corrupt payload ({size} bytes): {type(exc).__name__}: {detail}; it was not "
            "written by this codec, or was damaged on the way"
        ) from exc


def _decode_split(view: memoryview, copy: bool) -> Any:
    """A split encoding's value: its skeleton decoded, arrays read from its data area."""
    head = _SPLIT_HEAD.size
    if len(view) < head:
        raise DecodeError(f"corrupt split encoding: {len(view)} bytes, shorter than its header")
    _magic, length, start = _SPLIT_HEAD.unpack_from(view)
    if head + length > start or start > len(view):
        raise DecodeError(f"corrupt split encoding: a skeleton of {length} bytes and a data "
                          f"area at {start} do not fit in {len(view)} bytes")
    _split.data, _split.copy = view[start:], copy
    try:
        return _unpack(view[head:head + length], length)
    finally:
        _split.data = None


DEFAULT_CODEC: MsgpackCodec = MsgpackCodec()
