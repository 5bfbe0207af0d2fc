"""Bad input, table-driven: each row gets its typed error, a message that says what to do,
and leaves the store exactly as it was.

API rows run against every backend (the contract's ``store`` fixture); CLI rows run
``shmstore`` (its ``main``) against a live server; codec rows call the codec directly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import shmstore
from shmstore import (
    AccessDenied,
    BaseStore,
    Checkpoint,
    CheckpointNotFound,
    ConfigError,
    DecodeError,
    EncodeError,
    Limits,
    MemoryStore,
    ShmstoreError,
    StoreFull,
    StoreUnavailable,
    VersionConflict,
)
from shmstore.cli.main import main as cli_main
from shmstore.core.codec import DEFAULT_CODEC, MsgpackCodec
from shmstore.core.config import read_connection_file, write_connection_file


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[BaseStore], Any]
    error: type[ShmstoreError]
    says: str  # a regex the message must match: what to do, or what it must be


def _cycle() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def _dict_cycle() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["me"] = {"again": d}
    return d


def _structured() -> Any:
    numpy = pytest.importorskip("numpy", reason="numpy is not installed")
    return numpy.zeros(1, dtype=[("a", "i4"), ("b", "f8")])[0]


def cp(**fields: Any) -> Checkpoint:
    return Checkpoint(**{"execution_id": "bad", **fields})


API_CASES = [
    Case("non-encodable state", lambda s: s.save(cp(state={"a": [1, object()]})),
         EncodeError, r"state\['a'\]\[1\].*convert it to a supported type"),
    Case("non-encodable metadata", lambda s: s.save(cp(metadata={"f": print})),
         EncodeError, r"metadata\['f'\].*convert it"),
    Case("a list cycle", lambda s: s.save(cp(state=_cycle())), EncodeError, r"break the cycle"),
    Case("a dict cycle", lambda s: s.save(cp(state=_dict_cycle())), EncodeError,
         r"state\['me'\]\['again'\].*break the cycle"),
    Case("an int above 2**64-1", lambda s: s.save(cp(state=2**64)), EncodeError,
         r"store it as a str or Decimal"),
    Case("an int below -2**63", lambda s: s.save(cp(state=[-(2**63) - 1])), EncodeError,
         r"state\[0\].*store it as a str or Decimal"),
    # Over the store's default max_checkpoint_bytes: the store's StoreFull, not the codec's
    # own bound (which used to answer first, with an EncodeError about max_bytes).
    Case("an oversize payload", lambda s: s.save(cp(state=b"x" * (64 * 2**20 + 1))),
         StoreFull, r"over max_checkpoint_bytes=67108864.*raise the limit \(nothing was sent\)"),
    Case("a structured numpy value", lambda s: s.save(cp(state={"row": _structured()})),
         EncodeError, r"state\['row'\].*convert it with \.item\(\)"),
    Case("one bad checkpoint in a save_many",
         lambda s: s.save_many([cp(state=1), cp(state=2), cp(state={1, object})]),
         EncodeError, r"convert it"),
    Case("not a Checkpoint", lambda s: s.save({"execution_id": "bad"}),  # type: ignore[arg-type]
         ConfigError, r"expected a Checkpoint"),
    Case("an empty execution id", lambda s: s.save(cp(execution_id="")), ConfigError,
         r"execution_id must not be empty"),
    Case("a non-str execution id", lambda s: s.save(cp(execution_id=7)), ConfigError,
         r"execution_id must be a str"),
    Case("an empty checkpoint id", lambda s: s.save(cp(id="")), ConfigError,
         r"id must not be empty"),
    Case("a 2000-character id", lambda s: s.save(cp(id="i" * 2000)), ConfigError,
         r"the limit is 1024"),
    Case("a non-str node name", lambda s: s.save(cp(node_name=3)), ConfigError,
         r"node_name must be a str"),
    Case("an empty parent id", lambda s: s.save(cp(parent_id="")), ConfigError,
         r"parent_id must not be empty"),
    Case("a negative version", lambda s: s.save(cp(version=-1)), ConfigError,
         r"version must be an int >= 0"),
    Case("a str timestamp", lambda s: s.save(cp(timestamp="yesterday")), ConfigError,
         r"timestamp must be a datetime"),
    Case("metadata not a dict", lambda s: s.save(cp(metadata=[1])), ConfigError,
         r"metadata must be a dict"),
    Case("a negative expected_version", lambda s: s.save(cp(), expected_version=-1),
         ConfigError, r"expected_version must be an int >= 0"),
    Case("a stale expected_version", lambda s: s.save(cp(execution_id="kept"),
                                                      expected_version=1),
         VersionConflict, r"load the latest and try again"),
    Case("load of an int id", lambda s: s.load(123), ConfigError,  # type: ignore[arg-type]
         r"must be a str"),
    Case("load of an empty id", lambda s: s.load(""), ConfigError, r"must not be empty"),
    Case("load of a missing id", lambda s: s.load("no-such-id"), CheckpointNotFound,
         r"no checkpoint with id 'no-such-id'"),
    Case("load_many with a None", lambda s: s.load_many(["x", None]),  # type: ignore[list-item]
         ConfigError, r"must be a str"),
    Case("a negative list limit", lambda s: s.list("kept", limit=-1), ConfigError,
         r"limit must be an int >= 0 or None"),
    Case("a float list limit", lambda s: s.list("kept", limit=1.5),  # type: ignore[arg-type]
         ConfigError, r"limit must be an int >= 0 or None"),
    Case("a negative before_version", lambda s: s.list("kept", before_version=-3),
         ConfigError, r"before_version must be an int >= 0"),
    Case("a negative wait timeout", lambda s: s.wait("kept", timeout=-1), ConfigError,
         r"timeout must be a number >= 0 or None"),
    Case("a NaN wait timeout", lambda s: s.wait("kept", timeout=math.nan), ConfigError,
         r"timeout must be a number >= 0"),
    Case("a negative after_version", lambda s: s.wait("kept", after_version=-1),
         ConfigError, r"after_version must be an int >= 0"),
    Case("delete of None", lambda s: s.delete(None), ConfigError,  # type: ignore[arg-type]
         r"must be a str"),
    Case("clear of an empty execution", lambda s: s.clear(""), ConfigError,
         r"must not be empty"),
    Case("a compute that is not callable",
         lambda s: s.load_or_compute("bad", "n", 5),  # type: ignore[arg-type]
         ConfigError, r"compute must be callable"),
    Case("memory_history since a str",
         lambda s: s.memory_history(since="now"),  # type: ignore[arg-type]
         ConfigError, r"since must be epoch seconds or None"),
]

CONFIG_CASES = [
    Case("a negative Limits.max_bytes", lambda s: Limits(max_bytes=-1), ConfigError,
         r"must be an int >= 1 or None \(no limit\)"),
    Case("a zero Limits.max_per_execution", lambda s: Limits(max_per_execution=0), ConfigError,
         r"must be an int >= 1 or None"),
    Case("a float Limits.max_checkpoints",
         lambda s: Limits(max_checkpoints=1.5),  # type: ignore[arg-type]
         ConfigError, r"must be an int >= 1"),
    Case("an unknown Limits.on_full", lambda s: Limits(on_full="drop"), ConfigError,
         r"must be 'reject' or 'evict'"),
    Case("limits of the wrong kind", lambda s: MemoryStore(limits=[1]),  # type: ignore[arg-type]
         ConfigError, r"must be a Limits or a dict"),
    Case("an http URL", lambda s: shmstore.connect("http://x", authkey=b"k"), ConfigError,
         r"use unix:///path/to.sock or tcp://127.0.0.1:PORT"),
    Case("a relative unix URL", lambda s: shmstore.connect("unix://rel.sock", authkey=b"k"),
         ConfigError, r"absolute path, e.g. unix:///"),
    Case("a TCP URL without a port", lambda s: shmstore.connect("tcp://127.0.0.1", authkey=b"k"),
         ConfigError, r"takes a host and a port"),
    Case("a too-long unix path", lambda s: shmstore.connect("unix:///" + "p" * 200, authkey=b"k"),
         ConfigError, r"choose a shorter path"),
    Case("a non-hex str authkey", lambda s: shmstore.connect("unix:///s.sock", authkey="zz"),
         ConfigError, r"must be hex"),
    Case("an empty authkey", lambda s: shmstore.connect("unix:///s.sock", authkey=b""),
         ConfigError, r"must not be empty"),
    Case("an int authkey", lambda s: shmstore.connect("unix:///s.sock", authkey=5),  # type: ignore[arg-type]
         ConfigError, r"must be bytes or a hex str"),
    Case("a zero client timeout",
         lambda s: shmstore.connect("unix:///s.sock", authkey=b"k", timeout=0),
         ConfigError, r"timeout must be a number > 0"),
    Case("a non-loopback bind", lambda s: shmstore.serve("tcp://0.0.0.0:0", export=False),
         ConfigError, r"pass allow_remote=True"),
    Case("an unreadable connection file", lambda s: read_connection_file(os.getcwd()),
         ConfigError, r"written by `shmstore serve --connection-file PATH`"),
    Case("a zero codec limit", lambda s: MsgpackCodec(max_bytes=0), ConfigError,
         r"must be a positive int or None"),
    Case("a str codec limit", lambda s: MsgpackCodec(max_bytes="1G"),  # type: ignore[arg-type]
         ConfigError, r"must be a positive int or None"),
    Case("a corrupt payload", lambda s: DEFAULT_CODEC.decode(b"\xc1"), DecodeError,
         r"corrupt payload"),
    Case("a truncated payload",
         lambda s: DEFAULT_CODEC.decode(DEFAULT_CODEC.encode([1, "abc"])[:-1]),
         DecodeError, r"corrupt payload.*incomplete"),
    Case("trailing bytes", lambda s: DEFAULT_CODEC.decode(b"\x01\x02"), DecodeError,
         r"followed by 1 extra bytes"),
    Case("an unknown extension type", lambda s: DEFAULT_CODEC.decode(b"\xd4\x63\x00"),
         DecodeError, r"unknown extension type code 99"),
    Case("a payload over the decode limit",
         lambda s: MsgpackCodec(max_bytes=4).decode(b"\xa5hello"), DecodeError,
         r"over the codec's limit of 4 bytes.*MsgpackCodec\(max_bytes=\.\.\.\)"),
    Case("a state over the encode limit",
         lambda s: MsgpackCodec(max_bytes=4).encode("hello"), EncodeError,
         r"store less, or make the codec with a larger MsgpackCodec\(max_bytes=\.\.\.\)"),
]


def _snapshot(store: BaseStore) -> dict[str, Any]:
    return {
        execution: [(c.id, c.version, c.node_name, c.state, c.metadata, c.timestamp)
                    for c in store.list(execution)]
        for execution in store.executions()
    }


@pytest.fixture
def seeded(store: BaseStore) -> BaseStore:
    store.save(Checkpoint(execution_id="kept", state={"n": 1}, metadata={"m": 1},
                          timestamp=datetime(2024, 1, 1)))
    store.save(Checkpoint(execution_id="kept", state={"n": 2}))
    return store


@pytest.mark.parametrize("case", API_CASES + CONFIG_CASES, ids=lambda c: c.name)
def test_bad_input_is_a_typed_error_and_the_store_is_unchanged(
    seeded: BaseStore, case: Case,
) -> None:
    before = _snapshot(seeded)
    with pytest.raises(case.error, match=case.says) as info:
        case.call(seeded)
    assert type(info.value) is case.error  # the type itself, not a catch-all parent
    assert _snapshot(seeded) == before
    # And the store still works.
    saved = seeded.save(Checkpoint(execution_id="after", state=case.name))
    assert seeded.load(saved.id).state == case.name


def test_a_wrong_authkey_is_access_denied_and_the_store_is_unchanged(
    shared_server: shmstore.StoreServer,
) -> None:
    with shared_server.connect(timeout=10) as good:
        before = _snapshot(good)
        with shmstore.connect(shared_server.url, authkey=os.urandom(32)) as bad:
            with pytest.raises(AccessDenied, match="use the key it was started with"):
                bad.save(Checkpoint(execution_id="intruder"))
        assert _snapshot(good) == before


def test_the_table_covers_what_the_issue_names() -> None:
    assert len(API_CASES) + len(CONFIG_CASES) + len(CLI_CASES) >= 30


# -- the command line ------------------------------------------------------------------------

CLI_CASES: list[tuple[str, list[str], str, str]] = [
    # (name, argv with {conn} {dir} {badjson} {wrongkey}, error type, regex)
    ("an http URL", ["ls", "--url", "http://x"], "ConfigError", r"use unix:///"),
    ("a connection file that is a directory", ["stats", "--connection-file", "{dir}"],
     "ConfigError", r"cannot read connection file.*shmstore serve --connection-file"),
    ("a connection file that is not JSON", ["stats", "--connection-file", "{badjson}"],
     "ConfigError", r"cannot read connection file"),
    ("a missing connection file", ["stats", "--connection-file", "{dir}/none.json"],
     "ConfigError", r"cannot read connection file"),
    ("an empty checkpoint id", ["show", "", "--connection-file", "{conn}"], "ConfigError",
     r"must not be empty"),
    ("a missing checkpoint", ["show", "nope", "--connection-file", "{conn}"],
     "CheckpointNotFound", r"no checkpoint with id 'nope'"),
    ("a negative --limit", ["ls", "kept", "--limit", "-1", "--connection-file", "{conn}"],
     "ConfigError", r"limit must be an int >= 0"),
    ("a zero --timeout", ["stats", "--timeout", "0", "--connection-file", "{conn}"],
     "ConfigError", r"timeout must be a number > 0"),
    ("a wrong key in the connection file", ["stats", "--connection-file", "{wrongkey}"],
     "AccessDenied", r"use the key it was started with"),
    ("a server that is not there", ["stats", "--connection-file", "{nobody}"],
     "StoreUnavailable", r"no shmstore server at"),
    ("a non-loopback serve", ["serve", "--address", "tcp://0.0.0.0:0"], "ConfigError",
     r"add --allow-remote"),
]


@pytest.mark.parametrize("name,argv,error,says", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_exits_with_a_typed_message_and_the_store_is_unchanged(
    shared_server: shmstore.StoreServer, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, name: str, argv: list[str], error: str, says: str,
) -> None:
    monkeypatch.setenv("SHMSTORE_AUTHKEY", os.urandom(32).hex())  # so --url rows reach the URL
    files = {"conn": tmp_path / "conn.json", "wrongkey": tmp_path / "wrong.json",
             "badjson": tmp_path / "bad.json", "nobody": tmp_path / "nobody.json"}
    write_connection_file(str(files["conn"]), shared_server.url, shared_server.authkey, 1)
    write_connection_file(str(files["wrongkey"]), shared_server.url, os.urandom(32), 1)
    write_connection_file(str(files["nobody"]), f"unix://{tmp_path}/none.sock",
                          os.urandom(32), 1)
    files["badjson"].write_text("{not json")
    names = {key: str(path) for key, path in files.items()} | {"dir": str(tmp_path)}
    with shared_server.connect(timeout=10) as store:
        store.save(Checkpoint(execution_id="kept", state=1))
        before = _snapshot(store)
        code = cli_main([arg.format(**names) for arg in argv])
        err = capsys.readouterr().err
        assert code == (1 if error == "CheckpointNotFound" else 2)  # 1: not found
        assert err.startswith(f"shmstore: {error}: "), err
        assert re.search(says, err), err
        assert _snapshot(store) == before
        for execution in store.executions():
            store.clear(execution)


def test_errors_name_their_data() -> None:
    # Spot checks that the typed errors carry their data as attributes.
    with pytest.raises(EncodeError) as enc:
        MemoryStore().save(cp(state={"rows": [1, object()]}))
    assert enc.value.path == "state['rows'][1]" and enc.value.type_name == "object"
    with pytest.raises(StoreUnavailable) as unavailable:
        shmstore.connect("unix:///nonexistent/s.sock", authkey=b"k").executions()
    assert unavailable.value.address == "unix:///nonexistent/s.sock"
    assert json.loads(json.dumps(enc.value.attrs)) == enc.value.attrs
