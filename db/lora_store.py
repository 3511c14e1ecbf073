"""The LoRA tables (migration 0006): the adapters callers upload (`lora_adapters`, one row per
(owner, name), the archive in object storage) and each caller's state of the upstream `/v1/lora/*`
routes (`lora_states`). Statements run on the job store's engine, straight on the driver as
`JobStore._run` does, with its error translation."""

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import Engine

from db.store import translated_errors
from pipeline.contract import GenerationRequest, LoraChoice

STORAGE_PREFIX = "loras"


def owner_segment(owner: str) -> str:
    """The owner's folder in storage keys (open mode's owner is the empty string)."""
    return owner or "-"


def adapter_prefix(owner: str, name: str) -> str:
    """Where the owner's uploads of adapter `name` are stored: `loras/<owner>/<name>/`."""
    return f"{STORAGE_PREFIX}/{owner_segment(owner)}/{name}/"


def adapter_key(owner: str, name: str, digest: str) -> str:
    """The object of one upload: `loras/<owner>/<name>/<sha256 hex>.zip`."""
    return f"{adapter_prefix(owner, name)}{digest.removeprefix('sha256:')}.zip"

_ADAPTER_COLUMNS = "owner, name, storage_key, digest, size_bytes, config, created_at"

SQL = {
    "upsert_adapter": f"""
        WITH previous AS (SELECT storage_key FROM lora_adapters WHERE owner = %(owner)s AND name = %(name)s)
        INSERT INTO lora_adapters (owner, name, storage_key, digest, size_bytes, config, created_at)
        VALUES (%(owner)s, %(name)s, %(storage_key)s, %(digest)s, %(size_bytes)s, %(config)s, now())
        ON CONFLICT (owner, name) DO UPDATE
            SET storage_key = EXCLUDED.storage_key, digest = EXCLUDED.digest, size_bytes = EXCLUDED.size_bytes,
                config = EXCLUDED.config, created_at = EXCLUDED.created_at
        RETURNING {_ADAPTER_COLUMNS}, (SELECT storage_key FROM previous) AS previous_key""",
    "get_adapters": f"""
        SELECT {_ADAPTER_COLUMNS} FROM lora_adapters WHERE owner = %(owner)s AND name = ANY(%(names)s)""",
    "list_adapters": f"""
        SELECT {_ADAPTER_COLUMNS} FROM lora_adapters WHERE owner = %(owner)s ORDER BY name LIMIT %(limit)s""",
    "delete_adapter": f"""
        DELETE FROM lora_adapters WHERE owner = %(owner)s AND name = %(name)s RETURNING {_ADAPTER_COLUMNS}""",
    "get_state": "SELECT state FROM lora_states WHERE owner = %(owner)s",
    "lock_state": "INSERT INTO lora_states (owner) VALUES (%(owner)s) ON CONFLICT (owner) DO NOTHING",
    "state_for_update": "SELECT state FROM lora_states WHERE owner = %(owner)s FOR UPDATE",
    "put_state": "UPDATE lora_states SET state = %(state)s, updated_at = now() WHERE owner = %(owner)s",
}


def empty_state() -> dict[str, Any]:
    return {"adapters": [], "active_adapter": None, "use_lora": False}


class LoraStore:
    """Uploaded adapters and /v1/lora/* states; rows as dicts."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def of(cls, source: Any) -> "LoraStore":
        """A LoraStore on the engine of a LoraStore, a JobStore, the HTTP Services or an Engine."""
        if isinstance(source, LoraStore):
            return source
        store = getattr(source, "store", source)  # Services -> JobStore
        return cls(getattr(store, "engine", store))

    def _run(self, statements: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Run the named statements in one transaction; the last one's rows."""
        with translated_errors():
            conn = self.engine.raw_connection()
            try:
                driver = conn.driver_connection
                rows: list[dict[str, Any]] = []
                with driver.transaction(), driver.cursor(row_factory=dict_row) as cur:
                    for name, params in statements:
                        cur.execute(SQL[name], params)
                        rows = cur.fetchall() if cur.description else []
                return rows
            except (psycopg.OperationalError, psycopg.InterfaceError):
                conn.invalidate()  # the pool must not hand this connection out again
                raise
            finally:
                conn.close()

    # --- uploaded adapters ----------------------------------------------------------------------

    def put_adapter(self, owner: str, name: str, *, storage_key: str, digest: str, size_bytes: int,
                    config: dict[str, Any]) -> dict[str, Any]:
        """Record (or replace) an upload; the row, with `previous_key`: the replaced upload's storage
        key (None if there was none)."""
        return self._run([("upsert_adapter", {"owner": owner, "name": name, "storage_key": storage_key,
                                               "digest": digest, "size_bytes": size_bytes, "config": Jsonb(config)})])[0]

    def adapters_named(self, owner: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The owner's uploads among `names`, by name."""
        if not names:
            return {}
        return {row["name"]: row for row in self._run([("get_adapters", {"owner": owner, "names": list(names)})])}

    def adapter(self, owner: str, name: str) -> dict[str, Any] | None:
        return self.adapters_named(owner, [name]).get(name)

    def adapters(self, owner: str, *, limit: int = 1000) -> list[dict[str, Any]]:
        return self._run([("list_adapters", {"owner": owner, "limit": limit})])

    def delete_adapter(self, owner: str, name: str) -> dict[str, Any] | None:
        """Delete the row; the deleted row, or None when there was none."""
        rows = self._run([("delete_adapter", {"owner": owner, "name": name})])
        return rows[0] if rows else None

    # --- /v1/lora/* state -----------------------------------------------------------------------

    def state(self, owner: str) -> dict[str, Any]:
        """The owner's state: {adapters: [{adapter_name, lora, scale, adapter_type}], active_adapter,
        use_lora}; the empty state when the owner never loaded one."""
        rows = self._run([("get_state", {"owner": owner})])
        return _complete(rows[0]["state"]) if rows else empty_state()

    def update_state(self, owner: str, change: Callable[[dict[str, Any]], Any]) -> tuple[dict[str, Any], Any]:
        """Read the owner's state with its row locked, let `change` edit it in place, write it back;
        (the new state, what `change` returned). An exception in `change` writes nothing."""
        with translated_errors():
            conn = self.engine.raw_connection()
            try:
                driver = conn.driver_connection
                with driver.transaction(), driver.cursor(row_factory=dict_row) as cur:
                    cur.execute(SQL["lock_state"], {"owner": owner})
                    cur.execute(SQL["state_for_update"], {"owner": owner})
                    state = _complete(cur.fetchone()["state"])
                    answer = change(state)
                    cur.execute(SQL["put_state"], {"owner": owner, "state": Jsonb(state)})
                return state, answer
            except (psycopg.OperationalError, psycopg.InterfaceError):
                conn.invalidate()
                raise
            finally:
                conn.close()


def _complete(state: Any) -> dict[str, Any]:
    full = empty_state()
    if isinstance(state, dict):
        full.update({k: v for k, v in state.items() if k in full})
    if not isinstance(full["adapters"], list):
        full["adapters"] = []
    return full


def apply_default_lora(svc_or_store: Any, owner: str, params: GenerationRequest) -> GenerationRequest:
    """`params` as its job stores it: with no `lora`, the owner's /v1/lora/* default (its adapters
    while use_lora is on); each adapter resolved to the owner's upload of that name (storage_key and
    digest) or, when there is none, to a checkpoint-dir folder (both null); `path` cleared. An empty
    list (explicitly no adapter) is stored as null."""
    store = LoraStore.of(svc_or_store)
    choices = params.lora
    if choices is None:
        state = store.state(owner)
        if not (state["use_lora"] and state["adapters"]):
            return params
        choices = [LoraChoice(name=entry["lora"], scale=entry["scale"]) for entry in state["adapters"]]
    if not choices:
        return params.model_copy(update={"lora": None})
    uploads = store.adapters_named(owner, [choice.name for choice in choices])
    resolved = []
    for choice in choices:
        row = uploads.get(choice.name)
        resolved.append(LoraChoice(name=choice.name, scale=choice.scale, storage_key=row["storage_key"] if row else None,
                                   digest=row["digest"] if row else None))
    return params.model_copy(update={"lora": resolved})
