"""Tests of the msgpack codec: round trips, error paths, limits and the wire format."""

from __future__ import annotations

import collections
import enum
import math
import pickle
import subprocess
import sys
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shmstore.core.codec import DEFAULT_CODEC, DEFAULT_MAX_BYTES, EMPTY_MAP, MsgpackCodec
from shmstore.core.errors import ConfigError, DecodeError, EncodeError

codec = DEFAULT_CODEC


def roundtrip(value: object) -> Any:
    return codec.decode(codec.encode(value))


def same(a: object, b: object) -> None:
    """Assert ``b`` equals ``a`` with the same types all the way down."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            same(a[key], b[key])
    elif isinstance(a, float):
        assert isinstance(b, float)
        assert a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    elif isinstance(a, Decimal):
        assert str(a) == str(b)
    elif isinstance(a, (datetime, time)):
        assert isinstance(b, (datetime, time))
        assert a == b and a.utcoffset() == b.utcoffset()
        assert (a.tzinfo is None) == (b.tzinfo is None)
    else:
        assert a == b


def ext_depth(value: object) -> int:
    """How deep tuples, sets and frozensets nest in ``value``."""
    if isinstance(value, (tuple, set, frozenset)):
        return 1 + max((ext_depth(v) for v in value), default=0)
    if isinstance(value, list):
        return max((ext_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return max((max(ext_depth(k), ext_depth(v)) for k, v in value.items()), default=0)
    return 0


# -- round trips ---------------------------------------------------------------------------

UTC_PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
ODD_OFFSET = timezone(-timedelta(hours=23, minutes=59, seconds=59, microseconds=999999))

SCALARS: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    0.0,
    -0.0,
    1.5,
    math.inf,
    -math.inf,
    1e-308,
    "",
    "héllo ✓ \U0001f600",
    b"",
    b"\x00\xff",
    datetime(2024, 2, 29, 23, 59, 59, 999999),
    datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC_PLUS_0530),
    datetime(2000, 1, 1, tzinfo=timezone.utc),
    datetime(1969, 12, 31, 23, 59, 59, 1),
    datetime(1, 1, 1, tzinfo=ODD_OFFSET),
    datetime.min,
    datetime.max,
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-12))),
    date(1, 1, 1),
    date(9999, 12, 31),
    date(1970, 1, 1),
    time(0, 0),
    time(23, 59, 59, 999999),
    time(12, 30, tzinfo=UTC_PLUS_0530),
    time(1, 2, 3, 4, tzinfo=ODD_OFFSET),
    timedelta(0),
    timedelta(days=-1, microseconds=1),
    timedelta.min,
    timedelta.max,
    timedelta(days=123456789, seconds=5, microseconds=7),
    Decimal("0"),
    Decimal("-0.000"),
    Decimal("1.2345678901234567890123456789E+999"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    Decimal("NaN"),
    Decimal("-sNaN42"),
    uuid.UUID(int=0),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalars_round_trip_exactly(value: object) -> None:
    same(value, roundtrip(value))


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalars_round_trip_inside_containers(value: object) -> None:
    wrapped = {"list": [value], "tuple": (value,), "nested": {"deeper": [(1, [value])]}}
    same(wrapped, roundtrip(wrapped))


def test_aware_datetime_keeps_its_offset_and_naive_stays_naive() -> None:
    aware = datetime(2024, 6, 1, 8, 15, tzinfo=UTC_PLUS_0530)
    back = roundtrip(aware)
    assert back == aware and back.utcoffset() == timedelta(hours=5, minutes=30)
    assert isinstance(back.tzinfo, timezone)
    assert (back.hour, back.minute) == (8, 15)
    naive = datetime(2024, 6, 1, 8, 15)
    assert roundtrip(naive).tzinfo is None


def test_zoneinfo_datetime_comes_back_with_its_fixed_offset() -> None:
    zoneinfo = pytest.importorskip("zoneinfo", reason="zoneinfo needs Python 3.9+")
    try:
        zone = zoneinfo.ZoneInfo("Europe/Paris")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    value = datetime(2024, 7, 1, 12, tzinfo=zone)
    back = roundtrip(value)
    assert back == value and back.utcoffset() == timedelta(hours=2)
    assert back.tzinfo == timezone(timedelta(hours=2))


def test_utc_comes_back_as_timezone_utc() -> None:
    assert roundtrip(datetime(2020, 1, 1, tzinfo=timezone.utc)).tzinfo is timezone.utc


def test_containers_keep_their_types() -> None:
    value = {
        "tuple": (1, (2, (3, ())), [4, (5,)]),
        "set": {1, "a", (2, 3), frozenset({4})},
        "frozenset": frozenset({b"x", (1, 2)}),
        "empty": [(), set(), frozenset(), {}, [], ""],
        (1, "a"): "tuple key",
        frozenset({1, 2}): "frozenset key",
        7: "int key",
        -3: "negative key",
        b"raw": "bytes key",
        None: "None key",
        2.5: "float key",
        date(2020, 1, 1): "date key",
        uuid.UUID(int=5): "uuid key",
    }
    same(value, roundtrip(value))


def test_tuple_nesting_up_to_eight_levels_round_trips() -> None:
    value: object = "core"
    for i in range(8):
        value = (value, i) if i % 3 else frozenset({value}) if i % 2 else (value,)
    same(value, roundtrip(value))


def test_dict_order_is_kept() -> None:
    value = {"b": 1, "a": 2, 3: 3, "c": 4}
    assert list(roundtrip(value)) == ["b", "a", 3, "c"]


def test_bytes_like_values_come_back_as_bytes() -> None:
    assert roundtrip([bytearray(b"ab"), memoryview(b"cd")]) == [b"ab", b"cd"]


class Color(enum.IntEnum):
    RED = 1


class Mode(str, enum.Enum):
    FAST = "fast"


class Point(NamedTuple):
    x: int
    y: int


class MyFloat(float):
    pass


class MyDatetime(datetime):
    pass


def test_subclasses_encode_as_their_base_type() -> None:
    value = [
        Color.RED,
        Mode.FAST,
        collections.OrderedDict(a=1),
        collections.defaultdict(list, b=[2]),
        Point(1, 2),
        MyFloat(2.5),
        MyDatetime(2020, 1, 2, 3),
    ]
    back = roundtrip(value)
    same([1, "fast", {"a": 1}, {"b": [2]}, (1, 2), 2.5, datetime(2020, 1, 2, 3)], back)


def test_nan_round_trips() -> None:
    back = roundtrip({"f": math.nan, "l": [math.nan], "t": (math.nan, -math.nan)})
    assert math.isnan(back["f"]) and math.isnan(back["l"][0])
    assert isinstance(back["t"], tuple) and all(math.isnan(x) for x in back["t"])
    assert math.copysign(1.0, back["t"][1]) == -1.0
    assert roundtrip(Decimal("NaN")).is_nan()
    assert roundtrip(Decimal("sNaN")).is_snan()


def test_empty_map_constant_is_the_encoding_of_an_empty_dict() -> None:
    assert codec.encode({}) == EMPTY_MAP
    assert codec.decode(EMPTY_MAP) == {}


def test_decode_accepts_bytes_like_input() -> None:
    data = codec.encode({"a": (1, 2)})
    assert codec.decode(memoryview(data)) == {"a": (1, 2)}
    assert codec.decode(bytearray(data)) == {"a": (1, 2)}


def test_default_codec_and_options() -> None:
    assert codec.max_bytes == DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    assert codec.own_max_bytes is None and repr(codec) == "MsgpackCodec()"
    assert codec.name == "msgpack"
    assert MsgpackCodec(max_bytes=10).max_bytes == MsgpackCodec(max_bytes=10).own_max_bytes == 10
    assert "max_bytes=10" in repr(MsgpackCodec(max_bytes=10))
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ConfigError):
            MsgpackCodec(max_bytes=bad)  # type: ignore[arg-type]


def test_numpy_is_imported_only_when_a_numpy_value_is_seen() -> None:
    script = (
        "import sys, datetime\n"
        "from shmstore.core.codec import DEFAULT_CODEC as c\n"
        "v = {'t': (1, {2}), 'd': datetime.datetime.now(), 'x': [1.5, b'b']}\n"
        "assert c.decode(c.encode(v)) == v\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


# -- numpy ---------------------------------------------------------------------------------


@pytest.fixture
def np() -> Any:
    return pytest.importorskip("numpy", reason="numpy is not installed")


NUMPY_DTYPES = [
    "bool",
    "int8",
    "uint8",
    "<i2",
    ">i4",
    "int64",
    "uint64",
    "float16",
    "float32",
    ">f8",
    "complex64",
    "complex128",
    "S5",
    "<U3",
    "M8[ns]",
    "m8[s]",
    "M8[10ms]",
]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 3), (3, 2, 4)])
def test_numpy_arrays_round_trip(np: Any, dtype: str, shape: tuple[int, ...]) -> None:
    count = math.prod(shape)
    raw = (np.arange(count * np.dtype(dtype).itemsize) % 251).astype(np.uint8).tobytes()
    if np.dtype(dtype).kind == "b":
        array = (np.arange(count) % 3 == 0).reshape(shape)
    else:
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    back = roundtrip({"a": array})["a"]
    assert type(back) is np.ndarray
    assert back.dtype == array.dtype and back.dtype.str == array.dtype.str
    assert back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    assert back.flags.writeable


@pytest.mark.parametrize("order", ["C", "F"])
def test_numpy_layouts_round_trip(np: Any, order: str) -> None:
    base = np.arange(60, dtype=np.float64).reshape((3, 4, 5), order=order)
    for array in (base, base[::2, ::-1, 1:4], base.T, base[:, 1, :]):
        back = roundtrip(array)
        assert back.shape == array.shape and np.array_equal(back, array)
        assert back.flags.writeable and back.flags.c_contiguous
        back[...] = 0  # writable for real


def test_numpy_nan_and_special_floats(np: Any) -> None:
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 1.0])
    back = roundtrip(array)
    assert np.array_equal(back, array, equal_nan=True)
    assert np.signbit(back[3])


DATETIME_UNITS = ["Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as"]


def numpy_scalars(np: Any) -> list[Any]:
    """One or more values of every numpy scalar type, each unit of datetime64/timedelta64."""
    values = [
        np.bool_(True), np.bool_(False),
        np.int8(-128), np.int16(-3), np.int32(2**31 - 1), np.int64(-(2**63)),
        np.uint8(255), np.uint16(7), np.uint32(2**32 - 1), np.uint64(2**64 - 1),
        np.float16(0.1), np.float32(-0.0), np.float64(np.nan), np.float64(1.5),
        np.longdouble(1) / np.longdouble(3), np.longdouble("-inf"),
        np.complex64(1 + 2j), np.complex128(complex(np.nan, -0.0)),
        np.clongdouble(np.longdouble(1) / 3 + 1j),
        np.str_(""), np.str_("ünï"), np.str_("a\x00"),
        np.bytes_(b""), np.bytes_(b"b\x00"),
        np.void(b""), np.void(b"ab\x00"),
        np.datetime64("NaT"), np.timedelta64("NaT"), np.datetime64(1, "10ms"),
    ]
    for unit in DATETIME_UNITS:
        values += [np.datetime64(-5, unit), np.datetime64("NaT", unit),
                   np.timedelta64(123_456_789, unit), np.timedelta64("NaT", unit)]
    return values


def same_numpy_scalar(a: Any, b: Any) -> None:
    """Assert ``b`` is ``a`` exactly: type, dtype (unit included) and every bit of value."""
    assert type(b) is type(a), (a, b)
    assert b.dtype == a.dtype and b.dtype.str == a.dtype.str, (a, b)
    if a.dtype.kind in "SU":
        assert type(a).__base__.__eq__(a, b)  # the str/bytes value, trailing NULs included
    elif a.dtype.char in "gG":
        # x87 long doubles carry padding bytes whose content is arbitrary
        assert np_equal_bits(a, b)
    else:
        assert a.tobytes() == b.tobytes(), (a, b)


def np_equal_bits(a: Any, b: Any) -> bool:
    import numpy

    if numpy.isnan(a) or numpy.isnan(b):
        return bool(numpy.isnan(a) and numpy.isnan(b))
    return bool(a == b) and bool(numpy.signbit(numpy.real(a)) == numpy.signbit(numpy.real(b)))


def test_numpy_scalars_round_trip_with_their_type_and_value(np: Any) -> None:
    values = numpy_scalars(np)
    back = roundtrip(values)
    assert len(back) == len(values)
    for a, b in zip(values, back, strict=True):
        same_numpy_scalar(a, b)
    # Inside containers and as dict keys too.
    nested = roundtrip({"t": (np.int8(1), {np.datetime64(3, "ns")}), np.uint16(2): "k"})
    assert type(nested["t"][0]) is np.int8
    assert next(iter(nested["t"][1])).dtype.str == "<M8[ns]"
    assert type(next(k for k in nested if k != "t")) is np.uint16


def test_a_nanosecond_datetime64_keeps_its_unit(np: Any) -> None:
    value = np.datetime64("2024-01-02T03:04:05.123456789", "ns")
    back = roundtrip(value)
    assert type(back) is np.datetime64 and back.dtype.str == "<M8[ns]" and back == value


def test_a_longdouble_scalar_round_trips(np: Any) -> None:
    value = np.longdouble(1) / np.longdouble(3)
    back = roundtrip({"x": value})["x"]
    assert type(back) is np.longdouble and back == value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_numpy_scalars_and_arrays_round_trip_exactly_hypothesis(data: st.DataObject) -> None:
    np = pytest.importorskip("numpy", reason="numpy is not installed")
    hnp = pytest.importorskip("hypothesis.extra.numpy", reason="hypothesis[numpy] is missing")
    dtype = data.draw(st.one_of(
        hnp.boolean_dtypes(), hnp.integer_dtypes(endianness="="),
        hnp.unsigned_integer_dtypes(endianness="="), hnp.floating_dtypes(endianness="="),
        st.just(np.dtype(np.longdouble)), hnp.complex_number_dtypes(endianness="="),
        st.just(np.dtype(np.clongdouble)),
        hnp.datetime64_dtypes(endianness="="), hnp.timedelta64_dtypes(endianness="="),
        hnp.byte_string_dtypes(endianness="=", min_len=1),
        hnp.unicode_string_dtypes(endianness="=", min_len=1),
    ), label="dtype")
    scalar = data.draw(hnp.from_dtype(dtype), label="scalar")
    if not isinstance(scalar, np.generic):  # from_dtype may give the Python value
        scalar = np.asarray(scalar, dtype=dtype)[()]
    same_numpy_scalar(scalar, roundtrip(scalar))
    array = data.draw(hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_side=4)),
                      label="array")
    back = roundtrip(array)
    assert type(back) is np.ndarray and back.dtype == array.dtype
    assert back.shape == array.shape
    if dtype.char in "gG":
        assert np.array_equal(back, array, equal_nan=True)
    else:
        assert back.tobytes() == array.tobytes()


def test_datetime64_and_longdouble_arrays_round_trip(np: Any) -> None:
    for unit in DATETIME_UNITS:
        for kind in ("M8", "m8"):
            raw = np.array([0, -7, np.iinfo(np.int64).min], dtype="<i8")  # min is NaT
            array = raw.view(f"<{kind}[{unit}]")
            back = roundtrip(array)
            assert back.dtype.str == array.dtype.str and back.tobytes() == array.tobytes()
    long = np.array([1, -0.0, np.inf], dtype=np.longdouble) / np.longdouble(3)
    back = roundtrip(long)
    assert back.dtype == np.longdouble and np.array_equal(back, long)
    void = np.array([b"ab\x00", b"\x01\x02\x03"], dtype="V3")
    back = roundtrip(void)
    assert back.dtype.str == "|V3" and back.tobytes() == void.tobytes()


def test_numpy_arrays_inside_containers(np: Any) -> None:
    value = {"pair": (np.zeros(2), np.ones((1, 1), dtype=np.int32)), "s": [np.array(3)]}
    back = roundtrip(value)
    assert isinstance(back["pair"], tuple)
    assert np.array_equal(back["pair"][0], np.zeros(2))
    assert back["pair"][1].dtype == np.int32 and back["s"][0].shape == ()


# -- hypothesis ----------------------------------------------------------------------------

offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
    max_value=timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
).map(timezone)
zones = st.none() | offsets

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.datetimes(timezones=zones),
    st.dates(),
    st.times(timezones=zones),
    st.timedeltas(),
    st.decimals(allow_nan=False),
    st.uuids(),
)
hashables = st.recursive(
    scalars,
    lambda inner: st.tuples(inner) | st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_property_every_supported_value_round_trips(value: object) -> None:
    assume(ext_depth(value) <= 8)
    same(value, roundtrip(value))


@given(st.lists(st.floats(), max_size=5).map(tuple))
def test_property_floats_including_nan_round_trip(value: tuple[float, ...]) -> None:
    back = roundtrip(value)
    assert isinstance(back, tuple) and len(back) == len(value)
    for a, b in zip(value, back, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )


def decode_or_decode_error(data: bytes) -> None:
    try:
        codec.decode(data)
    except DecodeError:
        pass


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_property_decoding_arbitrary_bytes_only_raises_decode_error(data: bytes) -> None:
    decode_or_decode_error(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_property_decoding_damaged_payloads_only_raises_decode_error(
    value: object, data: st.DataObject
) -> None:
    assume(ext_depth(value) <= 8)
    payload = bytearray(codec.encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(payload)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and where < len(payload):
            payload[where] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del payload[where:]
        else:
            payload[where:where] = data.draw(st.binary(min_size=1, max_size=4))
    decode_or_decode_error(bytes(payload))


# -- encode errors -------------------------------------------------------------------------


def encode_error(value: object, **kw: Any) -> EncodeError:
    with pytest.raises(EncodeError) as info:
        codec.encode(value, **kw)
    return info.value


def test_unsupported_value_names_its_path_and_type() -> None:
    error = encode_error({"rows": [0, 1, 2, {"id": 3, "when": object()}]})
    assert error.path == "state['rows'][3]['when']"
    assert error.type_name == "object"
    assert "state['rows'][3]['when']" in str(error) and "object" in str(error)
    assert "convert it to a supported type" in str(error)
    assert isinstance(error, TypeError)


def test_root_name_is_used_in_the_path() -> None:
    error = encode_error({"tags": [1j]}, root="metadata")
    assert (error.path, error.type_name) == ("metadata['tags'][0]", "complex")


def test_the_first_offending_value_is_reported() -> None:
    error = encode_error([1, (2, {"a": object()}), 2**70, set()])
    assert error.path == "state[1][1]['a']"


def test_paths_through_tuples_sets_and_keys() -> None:
    assert encode_error({"t": (1, (2, object()))}).path == "state['t'][1][1]"
    assert encode_error({"s": {object()}}).path == "state['s']{0}"
    assert encode_error({"f": frozenset({(1, object())})}).path == "state['f']{0}[1]"
    error = encode_error({"ok": 1, object(): 2})
    assert error.path == "state.keys()[1]" and error.type_name == "object"


def test_user_classes_are_named_with_their_module() -> None:
    class Custom:
        pass

    error = encode_error([Custom()])
    assert (
        error.type_name
        == f"{__name__}.test_user_classes_are_named_with_their_module.<locals>.Custom"
    )


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**100])
def test_ints_outside_64_bits_are_refused(number: int) -> None:
    error = encode_error({"n": [number]})
    assert (error.path, error.type_name) == ("state['n'][0]", "int")
    assert "64-bit" in str(error)


def test_lone_surrogates_are_refused() -> None:
    error = encode_error({"s": "ok\ud800"})
    assert (error.path, error.type_name) == ("state['s']", "str")


def test_non_contiguous_memoryview_is_refused_clearly() -> None:
    error = encode_error([memoryview(b"abcd")[::2]])
    assert error.path == "state[0]" and "contiguous" in str(error)


def test_list_cycle() -> None:
    loop: list[object] = [1]
    loop.append(loop)
    error = encode_error({"loop": loop})
    assert error.path == "state['loop'][1]" and error.type_name == "list"
    assert "cycle" in str(error) and "state['loop']" in str(error)


def test_dict_cycle() -> None:
    node: dict[str, object] = {}
    node["self"] = node
    error = encode_error(node)
    assert error.path == "state['self']" and error.type_name == "dict"
    assert "cycle" in str(error)


def test_cycle_through_a_tuple() -> None:
    inner: list[object] = []
    outer = (inner,)
    inner.append(outer)
    error = encode_error({"t": outer})
    assert error.path == "state['t'][0][0]" and error.type_name == "tuple"
    assert "cycle" in str(error)


def test_shared_but_acyclic_values_are_fine() -> None:
    shared = [1, 2]
    assert roundtrip({"a": shared, "b": (shared, shared)}) == {"a": [1, 2], "b": ([1, 2], [1, 2])}


def test_too_deep_nesting_is_refused() -> None:
    value: object = 1
    for _ in range(3000):
        value = [value]
    error = encode_error(value)
    assert "nested more than" in str(error)
    assert error.path.startswith("state[0][0]")


def test_tuples_nested_more_than_eight_deep_are_refused() -> None:
    value: object = 1
    for _ in range(9):
        value = (value,)
    error = encode_error({"deep": value})
    assert error.path == "state['deep']" + "[0]" * 8 and error.type_name == "tuple"
    assert "use lists" in str(error)


def test_object_dtype_array_is_refused(np: Any) -> None:
    error = encode_error({"a": [np.array([1, None], dtype=object)]})
    assert (error.path, error.type_name) == ("state['a'][0]", "numpy.ndarray")
    assert "object" in str(error) and "pickle" in str(error)


def test_structured_dtype_array_is_refused(np: Any) -> None:
    error = encode_error(np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]))
    assert error.path == "state"


def test_structured_numpy_scalars_are_refused_with_what_to_do(np: Any) -> None:
    row = np.zeros(1, dtype=[("a", "i4"), ("b", "f8")])[0]
    error = encode_error({"rows": [row]})
    assert (error.path, error.type_name) == ("state['rows'][0]", "numpy.void")
    assert ".item()" in str(error) and "numpy.asarray" in str(error)
    subarray = np.zeros(1, dtype=[("a", "i4", (2,))])[0]
    assert encode_error(subarray).type_name == "numpy.void"
    assert encode_error(np.zeros(2, dtype="V0")).type_name == "numpy.ndarray"


@pytest.mark.parametrize(
    "parts",
    [
        ["<i8", b"\x00" * 7],
        ["<i8", "text"],
        ["|b1", b"\x02"],
        ["<U1", b"a"],
        ["|S1", "a"],
        ["|V2", b"\x00"],
        [">i8", b"\x00" * 8],  # numpy scalars are native: never written
        ["=i8", b"\x00" * 8],  # not the spelling encode writes
        ["|O8", b"\x00" * 8],
        ["<i8"],
        [8, b"\x00" * 8],
    ],
)
def test_malformed_numpy_scalar_payloads_are_refused(np: Any, parts: list[object]) -> None:
    assert "numpy scalar" in str(decode_error(ext(11, parts)))


def test_encode_over_the_limit_is_refused() -> None:
    small = MsgpackCodec(max_bytes=100)
    assert small.decode(small.encode(b"x" * 90)) == b"x" * 90
    with pytest.raises(EncodeError) as info:
        small.encode({"blob": b"x" * 200}, root="metadata")
    assert (info.value.path, info.value.type_name) == ("metadata", "dict")
    assert "100" in str(info.value) and "max_bytes" in str(info.value)


def test_errors_pickle_with_their_attributes() -> None:
    error = encode_error({"x": object()})
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is EncodeError
    assert (back.path, back.type_name, str(back)) == (error.path, error.type_name, str(error))
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\xc1")
    back_decode = pickle.loads(pickle.dumps(info.value))
    assert type(back_decode) is DecodeError and str(back_decode) == str(info.value)
    assert isinstance(back_decode, ValueError)


# -- decode errors -------------------------------------------------------------------------


def decode_error(data: bytes, use: MsgpackCodec = codec) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        use.decode(data)
    assert isinstance(info.value, ValueError)
    return info.value


def ext(code: int, parts: object) -> bytes:
    data: bytes = msgpack.packb(msgpack.ExtType(code, msgpack.packb(parts, use_bin_type=True)))
    return data


def test_a_call_bound_replaces_the_codec_bound() -> None:
    big = b"x" * (DEFAULT_MAX_BYTES + 1)
    encode_error(big)  # on its own, the default codec bounds at 64 MiB
    data = codec.encode(big, max_bytes=None)  # what a store asks for: no bound of its own
    assert codec.decode(data, max_bytes=None) == big
    decode_error(data)
    del big, data
    assert "max_bytes" in str(encode_error("hello", max_bytes=4))
    assert codec.decode(codec.encode("hi"), max_bytes=3) == "hi"


def test_decode_over_the_limit_is_refused_before_unpacking() -> None:
    small = MsgpackCodec(max_bytes=10)
    assert small.decode(codec.encode("x" * 9)) == "x" * 9
    error = decode_error(codec.encode("x" * 10), small)
    assert "11 bytes" in str(error) and "max_bytes" in str(error)
    decode_error(b"\xc1" * 11, small)  # rejected on size alone, garbage or not


def test_truncated_payloads_are_refused() -> None:
    data = codec.encode({"a": (1, "two", [3.0]), "b": datetime(2020, 1, 1), "c": b"x" * 40})
    for cut in range(len(data)):
        decode_error(data[:cut])


def test_trailing_data_is_refused() -> None:
    error = decode_error(codec.encode([1, 2]) + b"\x00")
    assert "extra" in str(error)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", b"\xd9\x05abc", b"\xa2\xff\xfe"])
def test_garbage_is_refused(data: bytes) -> None:
    decode_error(data)


def test_unhashable_keys_and_members_are_refused() -> None:
    decode_error(b"\x81\x91\x01\x02")  # {[1]: 2}
    decode_error(ext(2, [[1]]))  # a set holding a list


@pytest.mark.parametrize("code", [0, 11, 42, 127, -5])
def test_unknown_ext_codes_are_refused(code: int) -> None:
    # [fixext1 with the code], by hand: msgpack.ExtType refuses negative codes
    error = decode_error(bytes([0x91, 0xD4, code & 0xFF, 0x90]))
    assert f"code {code}" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        ext(1, 5),  # tuple payload that is not an array
        ext(4, []),
        ext(4, [1, 2, 3]),
        ext(4, ["x"]),
        ext(4, [10**18]),  # past year 9999
        ext(4, [0, 86_400_000_000]),  # a whole day of offset
        ext(5, [10**9]),
        ext(6, [86_400_000_000]),
        ext(6, [-1]),
        ext(7, [1, 2]),
        ext(7, [10**12, 0, 0]),
        ext(8, ["not a number"]),
        ext(8, [1]),
        ext(9, [b"short"]),
        ext(9, ["0" * 16]),
        msgpack.packb(msgpack.ExtType(4, b"\xc1")),
        msgpack.packb(msgpack.ExtType(4, b"\x91\x01\x00")),  # trailing byte in the payload
    ],
)
def test_malformed_ext_payloads_are_refused(data: bytes) -> None:
    assert "malformed" in str(decode_error(data))


def test_ext_nesting_deeper_than_the_encoder_allows_is_refused() -> None:
    payload = msgpack.packb([1])
    for _ in range(20):
        payload = msgpack.packb([msgpack.ExtType(1, payload)])
    decode_error(msgpack.packb(msgpack.ExtType(1, payload)))


@pytest.mark.parametrize(
    "parts",
    [
        ["<f8", [3], b"\x00" * 23],  # one byte short
        ["<f8", [3], b"\x00" * 25],
        ["<f8", [2, 2**62], b""],
        ["|O", [1], b"\x00" * 8],  # object dtype: never
        ["<V8", [1], b"\x00" * 8],
        ["float64", [1], b"\x00" * 8],
        ["<f8; import os", [1], b"\x00" * 8],
        ["|S0", [1], b""],
        ["<f8", [-1], b""],
        ["<f8", "3", b"\x00" * 24],
        ["<f8", [3], "text"],
        ["<f8", [1] * 100, b"\x00" * 8],
        ["<f8", [3]],
    ],
)
def test_malformed_numpy_payloads_are_refused(np: Any, parts: list[object]) -> None:
    assert "ndarray" in str(decode_error(ext(10, parts)))


def test_msgpack_timestamps_decode_as_utc_datetimes() -> None:
    data = msgpack.packb(msgpack.Timestamp(seconds=86400, nanoseconds=5000))
    assert codec.decode(data) == datetime(1970, 1, 2, 0, 0, 0, 5, tzinfo=timezone.utc)


# -- wire format ---------------------------------------------------------------------------
# Each expectation is derived by hand from the layout in the module docstring; they pin the
# format other backends read.


@pytest.mark.parametrize(
    ("value", "hex_bytes"),
    [
        ({}, "80"),
        ((1, 2), "c7 03 01 92 01 02"),  # ext8 len 3 code 1, payload [1, 2]
        ({"a": (1,)}, "81 a1 61 d5 01 91 01"),  # fixext2 code 1, payload [1]
        (set(), "d4 02 90"),  # fixext1 code 2, payload []
        (frozenset({7}), "d5 03 91 07"),
        (datetime(1970, 1, 1, 0, 0, 1), "c7 06 04 91 ce 00 0f 42 40"),  # [1_000_000]
        (
            datetime(1970, 1, 1, tzinfo=timezone(timedelta(hours=1))),
            "c7 07 04 92 00 ce d6 93 a4 00",  # [0, 3_600_000_000]
        ),
        (datetime(1969, 12, 31, 23, 59, 59, 999999), "d5 04 91 ff"),  # [-1]
        (date(1970, 1, 2), "d5 05 91 01"),
        (date(1969, 12, 31), "d5 05 91 ff"),
        (time(0, 0, 1), "c7 06 06 91 ce 00 0f 42 40"),
        (timedelta(days=1, seconds=2, microseconds=3), "d6 07 93 01 02 03"),
        # normalised to days=-1, seconds=86399, microseconds=999999
        (timedelta(microseconds=-1), "c7 0c 07 93 ff ce 00 01 51 7f ce 00 0f 42 3f"),
        (Decimal("1.5"), "c7 05 08 91 a3 31 2e 35"),
        (uuid.UUID(int=1), "c7 13 09 91 c4 10" + " 00" * 15 + " 01"),
        (b"ab", "c4 02 61 62"),
        ("ab", "a2 61 62"),
    ],
)
def test_wire_format(value: object, hex_bytes: str) -> None:
    expected = bytes.fromhex(hex_bytes)
    assert codec.encode(value) == expected
    same(value, codec.decode(expected))


def test_numpy_wire_format(np: Any) -> None:
    # ext8 len 13 code 10, payload ['<i2', [2], bin 01 00 02 00]
    expected = bytes.fromhex("c7 0d 0a 93 a3 3c 69 32 91 02 c4 04 01 00 02 00")
    assert codec.encode(np.array([1, 2], dtype="<i2")) == expected
    back = codec.decode(expected)
    assert back.dtype.str == "<i2" and back.tolist() == [1, 2]


def test_numpy_scalar_wire_format(np: Any) -> None:
    # ext8 len 9 code 11, payload ['<i2', bin 01 00]
    assert codec.encode(np.int16(1)) == bytes.fromhex("c7 09 0b 92 a3 3c 69 32 c4 02 01 00")
    # ['<U2', 'a\0']: the str itself, so the trailing NUL survives
    data = bytes.fromhex("d7 0b 92 a3 3c 55 32 a2 61 00")  # fixext8: 8 payload bytes
    assert codec.encode(np.str_("a\x00")) == data
    assert str.__eq__(codec.decode(data), "a\x00")


def test_long_double_padding_is_not_written(np: Any) -> None:
    if np.finfo(np.longdouble).nmant != 63 or np.dtype(np.longdouble).itemsize <= 10:
        pytest.skip("long double is not x87 extended precision on this platform")
    for value in (np.clongdouble(1j), np.longdouble(1) / 3, np.clongdouble(-0.5 + 2j)):
        payload = msgpack.unpackb(msgpack.unpackb(codec.encode(value)).data)[1]
        part = value.dtype.itemsize // (2 if value.dtype.kind == "c" else 1)
        for start in range(0, len(payload), part):
            assert payload[start + 10:start + part] == bytes(part - 10), (value, payload)
        same_numpy_scalar(value, codec.decode(codec.encode(value)))
