"""The run's configuration: YAML validated into typed, frozen models, before any request.

Durations are in provider seconds. Against the embedded sandbox (`api.base_url: sandbox`) every
duration the client waits is multiplied by `sandbox.time_scale`, as the sandbox's are, so a
shrunk run keeps the real run's proportions; against any other URL, by `api.time_scale` (1.0).
Relative paths are read from the config file's folder; `output.dir` may hold strftime fields
(`runs/%Y-%m-%d`), filled in once when the config is loaded.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import datetime
import difflib
import glob
import hashlib
import json
import re
import time
import typing
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from pipeline.core.double import SandboxSettings
from pipeline.core.errors import ConfigError
from pipeline.core.faults import FaultRates
from pipeline.core.rules import GENERIC, PRESETS, RULES, Threshold
from pipeline.core.schema import INPUT_FIELDS, MODEL, SIZES, is_loopback_host
from pipeline.core.storage import is_object_url

__all__ = ["KEPT_MANIFEST", "SANDBOX", "ChecksSection", "RunConfig", "load_config"]

SANDBOX = "sandbox"
# the run folder's copy of its manifest (an object URL's, or a local file's), its suffix after
KEPT_MANIFEST = "manifest-source"


_DAY = 86400.0


class _Section(BaseModel):
    # no setting is infinite or NaN: each would hang a run or book "$inf"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ApiSection(_Section):
    base_url: str = "https://api.eachlabs.ai/v1"
    model: str = MODEL
    price_per_image_usd: float = Field(0.03, ge=0, le=100)
    time_scale: float = Field(1.0, ge=0.001, le=100)
    connect_timeout_s: float = Field(10.0, gt=0, le=3600)
    read_timeout_s: float = Field(30.0, gt=0, le=3600)
    http2: bool = False  # HTTP/2 over TLS where the provider offers it (ALPN), else HTTP/1.1
    # how the key is sent: `Authorization: Bearer` (the provider's one documented way), or the
    # older `X-API-Key` header for a gateway that still asks for it
    auth: Literal["bearer", "x-api-key"] = "bearer"
    # a saved fallback chain of the provider's, named on every create (`fallback_selector`)
    fallback_selector: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value != SANDBOX and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL or '{SANDBOX}'")
        return value.rstrip("/")


class LimitsSection(_Section):
    creates_per_window: int = Field(100, ge=1, le=1_000_000)
    window_s: float = Field(60.0, ge=0.001, le=_DAY)
    max_concurrent: int = Field(10, ge=1, le=10_000)
    # keys of one account, sharing one max_concurrent (the provider's cap is per account):
    # each key named by its position in EACHLABS_API_KEYS (1 is the first) or its hash
    groups: list[list[int | str]] = Field(default_factory=list)

    def jobs_per_s(
        self,
        latency_s: float,
        keys: int = 1,
        *,
        window_s: float | None = None,
        one_group: bool = False,
    ) -> float:
        """The most jobs a second `keys` keys can finish at this latency: each is held to
        `creates_per_window` per window, and to `max_concurrent` jobs in flight (shared by
        them all when `one_group`), whichever binds first. The one capacity formula, read by
        the estimate, the summary, the Ray workers' spread and the benchmark; `window_s` in the
        clock's seconds when a time scale shrinks it."""
        window = self.window_s if window_s is None else window_s
        creates = keys * self.creates_per_window / window
        caps = 1 if one_group else keys
        return min(creates, caps * self.max_concurrent / max(latency_s, 1e-9))


class PollingSection(_Section):
    job_timeout_s: float = Field(900.0, gt=0, le=7 * _DAY)
    # a job cancelled (at its timeout, a second signal, budget.cancel_in_flight) is polled this
    # long for the provider to confirm its end; one still running then is left for the next run
    cancel_grace_s: float = Field(30.0, gt=0, le=_DAY)
    expected_latency_s: float = Field(10.0, ge=0.01, le=_DAY)
    target_delay_s: float = Field(0.15, ge=0.001, le=3600)
    # the schedule aims at a mean notice delay of `delay_fraction` of the mean latency with as
    # few polls as that takes, and never plans more than `polls_per_job` per job on average
    # (0.6 fewer, kept for late jobs and retried polls): at a 30 % spread nearly 10 are made, at
    # 5 % about 3. `delay_fraction: null` always spends the whole budget.
    polls_per_job: float = Field(10.0, ge=1, le=1000)
    delay_fraction: float | None = Field(0.015, ge=1e-4, le=1)
    min_interval_s: float = Field(0.1, ge=0.001, le=3600)
    max_interval_s: float = Field(30.0, ge=0.001, le=3600)
    # without webhooks, each key's executions listing (GET /v1/executions) is read every
    # `delay_fraction` of the median latency while its jobs may be ending: one request
    # tells the ends of all its jobs, and each end is confirmed by one poll of the job. A job
    # the listing misses is polled past its expected end (webhook.fallback_after_s); after
    # webhook.missed_callbacks such ends in a row, or a provider without the listing (404), the
    # run polls each job on the schedule. false: the schedule alone
    listing: bool = True

    @model_validator(mode="after")
    def _order(self) -> PollingSection:
        if self.min_interval_s > self.max_interval_s:
            raise ValueError("min_interval_s must not exceed max_interval_s")
        return self


class RetriesSection(_Section):
    max_attempts: int = Field(5, ge=1, le=100)
    backoff_initial_s: float = Field(1.0, ge=0.001, le=3600)
    backoff_max_s: float = Field(30.0, ge=0.001, le=_DAY)
    retry_after_max_s: float = Field(120.0, ge=0.001, le=_DAY)
    ambiguous_creates: Literal["retry", "fail"] = "retry"
    # a create whose answer was lost is looked for in its key's executions listing (with
    # polling.listing) this long after it, for the provider's listing to catch up, before it
    # is adopted or created again
    lost_create_settle_s: float = Field(2.0, ge=0, le=600)
    # how far the provider's clock may be from ours: the listing is searched this much before
    # a lost create's send and after its answer was due, and this much before a key's oldest
    # job in flight (real seconds, never scaled)
    lost_create_skew_s: float = Field(2.0, ge=0, le=600)
    # how long a lost create may wait for the listing to prove what it made (its job, or that
    # nothing was made) before its row is left flagged for the next run to look up again
    lost_create_patience_s: float = Field(120.0, ge=0, le=_DAY)
    # every key's requests failing (transport errors, 5xx) for `outage_after_s` in a row is an
    # outage: no create is sent, the provider is probed with backoff for `outage_patience_s`,
    # and the run stops (exit 10) with the unsent rows kept unsent if it does not come back
    outage_after_s: float = Field(60.0, gt=0, le=_DAY)
    outage_patience_s: float = Field(900.0, ge=0, le=7 * _DAY)


class FillDown(_Section):
    """`manifest.fill_down`: blank cells of `columns` take the value of the first row above
    with the same `by` (Shopify writes a product's Title, Vendor and Type on its first row)."""

    by: str | list[str]
    columns: list[str] = Field(min_length=1)

    @property
    def by_columns(self) -> tuple[str, ...]:
        return (self.by,) if isinstance(self.by, str) else tuple(self.by)


class ManifestSection(_Section):
    path: Path  # a local file; given as an object URL, the run folder's copy of it
    # the object URL `path` was given as (s3://bucket/key, gs://..., az://...): a run copies it
    # into its folder when it starts (and again with --force), and reads the copy
    source: str | None = None
    # the local file `path` was given as, when the run reads its copy in the run folder (made
    # when the run starts, and again with --force)
    given: Path | None = None
    # csv, tsv, parquet or xlsx; a folder or a glob (a Spark or Hive output) is Parquet
    format: Literal["csv", "tsv", "parquet", "xlsx"] | None = None
    delimiter: str | None = None  # one character; "," for CSV, a tab for TSV
    encoding: str = "utf-8-sig"  # of a CSV or TSV file: cp1252, latin-1, utf-16 (Excel), ...
    # the column whose value is a row's id, or several whose values together are (Shopify:
    # [Handle, Image Position]); ids must be unique
    id_column: str | list[str] | None = None
    # the prompt from the row: `{Column Name}` fields filled with the row's values, as they are
    prompt_template: str | None = None
    skip_if_blank: list[str] = Field(default_factory=list)  # API fields: blank there = skipped
    # an image cell with more images than the image fields left: rejected, or the first sent
    extra_images: Literal["reject", "keep_first"] = "reject"
    columns: dict[str, str] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)
    batch_rows: int = Field(5000, ge=1, le=1_000_000)
    allow_loopback_urls: bool = False
    # rows whose input (seed included) an earlier row already sends share its job and outputs
    dedupe: bool = True
    # check public HTTPS inputs before any create (reachable, an image, at most 20 MB)
    check_urls: bool = False
    # the 1-based line of the header in a CSV or TSV (or the sheet's row): lines above it are
    # an export's template lines (an Amazon flat file is recognised without it)
    header_row: int | None = Field(None, ge=1, le=1000)
    sheet: str | None = None  # of an .xlsx manifest: the sheet read (default: the first)
    # a product's fields filled from its first row into the rows below it sharing `by`
    fill_down: FillDown | None = None
    # an image cell's images: the first edited and the others sent as references, or each
    # one its own edit (`<id>/<position>`)
    images: Literal["references", "each"] = "references"
    where: str | None = None  # a row filter over the columns (see `intake/where.py`)
    url_base: str | None = None  # a relative image path (`/m/b/mb01.jpg`) is joined to it

    @field_validator("url_base")
    @classmethod
    def _http_base(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"must be an http(s):// URL, not {value!r}")
        return value

    @field_validator("columns", "defaults")
    @classmethod
    def _api_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if name not in INPUT_FIELDS:
                raise ValueError(
                    f"{name!r} is not an API input field (allowed: {', '.join(INPUT_FIELDS)})"
                )
        return value

    @field_validator("skip_if_blank")
    @classmethod
    def _skip_fields(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in INPUT_FIELDS:
                raise ValueError(
                    f"{name!r} is not an API input field (allowed: {', '.join(INPUT_FIELDS)})"
                )
        return value

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 1 or value in '"\r\n'):
            raise ValueError("must be one character, not a quote or a line break")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"{value!r} is not an encoding Python knows") from None
        return value

    @field_validator("id_column")
    @classmethod
    def _id_columns(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of id columns must name each column once")
        return value

    @property
    def id_columns(self) -> tuple[str, ...]:
        if self.id_column is None:
            return ()
        return (self.id_column,) if isinstance(self.id_column, str) else tuple(self.id_column)

    @property
    def id_column_name(self) -> str | None:
        """The id column, when one column is the id (results put it beside `job_id`)."""
        return self.id_column if isinstance(self.id_column, str) else None

    @field_validator("defaults")
    @classmethod
    def _default_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = value.get("size")
        if size is not None:  # read as a cell is: `2k` is 2K
            canonical = str(size).strip().upper()
            if canonical not in SIZES:
                raise ValueError(f"size default must be one of {', '.join(SIZES)}")
            value = {**value, "size": canonical}
        n = value.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4):
            raise ValueError("n default must be an integer from 1 to 4")
        return value

    @property
    def kind(self) -> Literal["csv", "tsv", "parquet", "xlsx"]:
        if self.format is not None:
            return self.format
        suffix = self.path.suffix.lower()
        if suffix in (".parquet", ".pq") or self.path.is_dir() or glob.has_magic(str(self.path)):
            return "parquet"
        if suffix in (".xlsx", ".xlsm"):
            return "xlsx"
        return "tsv" if suffix in (".tsv", ".tab") else "csv"

    @property
    def separator(self) -> str:
        """The field delimiter of a CSV or TSV manifest."""
        return self.delimiter or ("\t" if self.kind == "tsv" else ",")


class OutputSection(_Section):
    dir: Path


class AssetsSection(_Section):
    """The edited images: downloaded once a job succeeds, checked, and kept in `store`."""

    download: bool = True
    # a folder (relative to output.dir) or an object-storage URL (s3://bucket/prefix, gs://...,
    # az://...), whose credentials come from the standard environment (AWS_ENDPOINT_URL,
    # AWS_ACCESS_KEY_ID, ...) and `storage_options`, never from this file's log or results
    store: str = "images"
    storage_options: dict[str, str] = Field(default_factory=dict)
    max_bytes: int = Field(
        50_000_000, ge=1, le=2_000_000_000
    )  # an image larger than this is refused
    concurrency: int = Field(8, ge=1, le=1000)  # downloads at once, apart from the API's slots
    attempts: int = Field(3, ge=1, le=100)  # per image and run; the next run tries again
    # the most one image's download may take, start to end (a server trickling bytes would
    # otherwise hold the run); one that takes longer fails this run, and the next fetches it
    download_timeout_s: float = Field(120.0, gt=0, le=86400)
    # where local and bucket inputs are uploaded (s3://bucket/prefix, gs://..., az://...); each
    # create is sent a presigned URL of its upload, valid this long (at most 7 days, S3's limit)
    # the report's thumbnail of each public input: fetched once per URL beside the downloads
    # (a second download of every input, if small); false leaves report.html without them
    input_thumbnails: bool = True
    upload_to: str | None = None
    upload_url_lifetime_s: float = Field(3600.0, gt=0, le=604800)


class ReportSection(_Section):
    # catalog columns shown beside each row in report.html (e.g. [Title, Vendor]), as the
    # manifest names them; a column a row lacks shows nothing
    columns: list[str] = Field(default_factory=list, max_length=20)


class ProgressSection(_Section):
    # a `progress` line this often on stderr (when it is not a terminal) and in run.log
    interval_s: float = Field(30.0, ge=0.01, le=_DAY)


class MetricsSection(_Section):
    """metrics.prom is always written; `port` also serves it for scraping while running."""

    port: int | None = Field(None, ge=0, le=65535)
    listen_host: str = "127.0.0.1"
    interval_s: float = Field(10.0, ge=0.01, le=_DAY)  # how often metrics.prom is rewritten


class RuleSetting(_Section):
    """One rule's threshold as the config sets it: a floor (`min`) or a ceiling (`max`), as the
    rule has, or `enabled: false` to leave it out."""

    min: float | None = None
    max: float | None = None
    enabled: bool = True


class ChecksSection(_Section):
    """The automatic checks measured on every stored edit (`pipeline.core.rules`)."""

    enabled: bool = True
    preset: Literal["amazon_main", "google_merchant", "shopify"] | None = None
    rules: dict[str, RuleSetting | bool] = Field(default_factory=dict)
    # an edit that fails a rule is made again with a new seed, up to this many times
    regenerate: int = Field(0, ge=0, le=10)

    @field_validator("rules")
    @classmethod
    def _known(cls, value: dict[str, RuleSetting | bool]) -> dict[str, RuleSetting | bool]:
        for name, setting in value.items():
            rule = RULES.get(name)
            if rule is None:
                close = difflib.get_close_matches(name, list(RULES), 1, 0.6)
                meant = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"{name}: no such rule{meant}; the rules: {', '.join(RULES)}")
            if isinstance(setting, RuleSetting):
                other = "max" if rule.bound == "min" else "min"
                if getattr(setting, other) is not None:
                    raise ValueError(
                        f"{name}: the rule is a {'floor' if rule.bound == 'min' else 'ceiling'}; "
                        f"give {rule.bound}, not {other}"
                    )
        return value

    def thresholds(self) -> list[Threshold]:
        """The rules this run holds each edit to, in the rules' order (none when disabled)."""
        if not self.enabled:
            return []
        chosen = {name: RULES[name].default for name in GENERIC}
        chosen.update(PRESETS.get(self.preset or "", {}))
        for name, setting in self.rules.items():
            if setting is False or (isinstance(setting, RuleSetting) and not setting.enabled):
                chosen.pop(name, None)
                continue
            given = getattr(setting, RULES[name].bound, None) if setting is not True else None
            chosen[name] = given if given is not None else chosen.get(name, RULES[name].default)
        return [Threshold(n, RULES[n].bound, chosen[n]) for n in RULES if n in chosen]


class BudgetSection(_Section):
    max_cost_usd: float | None = Field(None, ge=0, le=1e9)
    # when the budget is reached, cancel the jobs in flight at the provider instead of letting
    # them end (and be billed)
    cancel_in_flight: bool = False
    # refuse to start creating (exit 9) when the organisation's balance, where the provider
    # tells it (GET /v1/billing/balance), is less than the run's estimate: the whole manifest
    # is read first, as `wanbatch estimate` reads it
    require_balance: bool = False


class IncrementalSection(_Section):
    """Skip rows whose exact input already succeeded in an earlier run (any run folder)."""

    enabled: bool = False
    state: Path | None = None  # the state store, shared by the runs that should share results

    @model_validator(mode="after")
    def _state_named(self) -> IncrementalSection:
        if self.enabled and self.state is None:
            raise ValueError("state: is required when enabled is true (a path, e.g. state.sqlite)")
        return self


class WebhookSection(_Section):
    """Job ends pushed by the provider. A callback is only a hint: it triggers one confirming
    poll, and a job is done only when a poll says so. Jobs whose callback does not come are
    polled (`fallback_after_s` past their expected end, then every `fallback_interval_s`); after
    `missed_callbacks` ends in a row found that way, the run polls as in polling mode."""

    enabled: bool = False
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(0, ge=0, le=65535)  # 0: a free port
    public_url: str | None = None  # what the provider posts to, a secret token appended
    fallback_after_s: float = Field(5.0, ge=0, le=_DAY)
    fallback_interval_s: float = Field(15.0, ge=0.001, le=_DAY)
    missed_callbacks: int = Field(5, ge=1, le=1_000_000)
    # the receiver faces the internet: connections at once (the oldest idle one makes room),
    # and wall seconds a connection may stay silent
    max_connections: int = Field(256, ge=1, le=100_000)
    idle_timeout_s: float = Field(5.0, ge=0.01, le=3600)

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return None if value is None else value.rstrip("/")


# what the run gives the embedded sandbox itself, and where from (said when a config sets one):
# made-up keys, the config's limits and price, its ledger in the run folder, inputs on loopback
_RUN_GIVES: dict[str, str] = {
    "keys": "counts them (sandbox.keys) and makes them up",
    "creates_per_window": "takes it from limits.creates_per_window",
    "window_s": "takes it from limits.window_s",
    "max_concurrent": "takes it from limits.max_concurrent",
    "price_per_image_usd": "takes it from api.price_per_image_usd",
    "ledger_path": "keeps its ledger in the run folder",
    "allow_loopback_urls": "always serves and fetches inputs on loopback",
    "fetch_inputs": "always fetches the inputs",
    "key_faults": "makes its keys up: there is no key to name (use sandbox.faults)",
    "groups": "makes its keys up: limits.groups names the keys that share a cap",
}
# the embedded sandbox answers as the provider does today, where the command's default is the
# seed document
_CONFIG_DEFAULTS: dict[str, Any] = {"api_shape": "today"}


def _setting(f: dataclasses.Field[Any], kind: Any) -> tuple[Any, Any]:
    """A sandbox setting as a field of the config's section: its type (faults by name), its
    default, its help."""
    if f.name == "faults":
        return dict[str, float], Field(default_factory=dict, description=f.metadata["help"])
    default = _CONFIG_DEFAULTS.get(f.name, f.default)
    return kind, Field(default, description=f.metadata["help"])


_HINTS = typing.get_type_hints(SandboxSettings)
_GIVEN: dict[str, Any] = {
    f.name: _setting(f, _HINTS[f.name])
    for f in dataclasses.fields(SandboxSettings)
    if f.name not in _RUN_GIVES
}
# a model of the double's settings the config may give, made from their one declaration
_SandboxSettingsSection: Any = create_model("_SandboxSettingsSection", __base__=_Section, **_GIVEN)


class SandboxSection(_SandboxSettingsSection):
    """The embedded sandbox (`api.base_url: sandbox`): how many keys it makes up, and any
    setting of the double (`core/double.py`, each declared there once) but those the run gives
    it (see `_RUN_GIVES`)."""

    keys: int = Field(1, ge=1, le=64)

    @field_validator("faults")
    @classmethod
    def _faults(cls, value: dict[str, float]) -> dict[str, float]:
        try:
            FaultRates(**value)
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from exc
        return value

    @model_validator(mode="after")
    def _as_the_double_checks(self) -> SandboxSection:
        """The double's own checks of its settings (a time scale above 0, a known shape...)."""
        SandboxSettings(keys=("k",), **self.settings())
        return self

    def setting(self, name: str) -> Any:
        """One of the double's settings this section gives."""
        return getattr(self, name)

    def settings(self) -> dict[str, Any]:
        """The double's settings this section gives (faults as FaultRates)."""
        given = self.model_dump(exclude={"keys"})
        given["faults"] = FaultRates(**given["faults"])
        return given


class RunConfig(_Section):
    api: ApiSection = ApiSection()
    limits: LimitsSection = LimitsSection()
    polling: PollingSection = PollingSection()
    retries: RetriesSection = RetriesSection()
    manifest: ManifestSection
    output: OutputSection
    budget: BudgetSection = BudgetSection()
    assets: AssetsSection = AssetsSection()
    incremental: IncrementalSection = IncrementalSection()
    webhook: WebhookSection = WebhookSection()
    sandbox: SandboxSection = SandboxSection()
    progress: ProgressSection = ProgressSection()
    report: ReportSection = ReportSection()
    metrics: MetricsSection = MetricsSection()
    checks: ChecksSection = ChecksSection()

    @model_validator(mode="after")
    def _uploads_outlive_jobs(self) -> RunConfig:
        lifetime, timeout = self.assets.upload_url_lifetime_s, self.polling.job_timeout_s
        if self.assets.upload_to is not None and lifetime <= timeout:
            raise ValueError(
                f"assets.upload_url_lifetime_s ({lifetime:g}) must be longer than "
                f"polling.job_timeout_s ({timeout:g}): the provider fetches an input after its "
                "create, and a job may wait that long"
            )
        return self

    @property
    def embedded_sandbox(self) -> bool:
        return self.api.base_url == SANDBOX

    @property
    def time_scale(self) -> float:
        """Wall seconds per provider second for every wait of the client."""
        return (
            float(self.sandbox.setting("time_scale"))
            if self.embedded_sandbox
            else self.api.time_scale
        )

    def digest(self) -> str:
        """What the run was asked to do, hashed: the config as validated, storage options left
        out (credentials may be in them)."""
        data = self.model_dump(mode="json")
        data["assets"].pop("storage_options", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def image_scale(self) -> float:
        """What the images come back at, of the size asked: the embedded sandbox's shrunk
        images (`sandbox.image_scale`), else the provider's own 1."""
        return float(self.sandbox.setting("image_scale")) if self.embedded_sandbox else 1.0

    @property
    def allow_loopback_urls(self) -> bool:
        return self.manifest.allow_loopback_urls or self.embedded_sandbox


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _meant(loc: tuple[int | str, ...]) -> str:
    """` (did you mean X?)` for an unknown key that is close to one its section has; for a
    setting the run gives the embedded sandbox, where it comes from."""
    if len(loc) == 2 and loc[0] == "sandbox" and str(loc[1]) in _RUN_GIVES:
        return f" (the embedded sandbox {_RUN_GIVES[str(loc[1])]})"
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field is not None else None
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), known, 1, 0.6) if known and loc else []
    return f" (did you mean {close[0]!r}?)" if close else ""


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for error in exc.errors():
        where = _location(error["loc"])
        said = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_meant(error['loc'])}")
        elif error["type"] == "missing":
            lines.append(f"  {where}: is required")
        elif not error["loc"]:  # a rule across sections: its message names the settings
            lines.append(f"  {said}")
        else:
            lines.append(f"  {where}: {said} (got {error.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n" + "\n".join(lines))


def _set_value(text: str) -> Any:
    """A `--set` value: a number, a boolean, null, `[a, b]` or `{k: v}` as YAML reads them;
    anything else is the text exactly as given (YAML would cut `#1 best seller` at the `#` and
    read `Background: pure white` as a mapping)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, dict | list):
        return value if text.lstrip().startswith(("{", "[")) else text
    if isinstance(value, str) or (value is None and text.strip() not in ("", "null", "~")):
        return text
    return value


def apply_overrides(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """`--set key.path=value` on a loaded document (a copy): `10`, `true`, `[a, b]` are what
    they look like, and text is kept exactly (see `_set_value`)."""
    data = copy.deepcopy(data)
    for item in sets:
        path, sep, text = item.partition("=")
        names = path.strip().split(".")
        if not sep or not all(names):
            raise ConfigError(f"--set {item!r}: expected key.path=value (e.g. output.dir=runs/x)")
        value = _set_value(text)
        node = data
        for name in names[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {name} is not a section")
        node[names[-1]] = value
    return data


def parse_config(
    data: Any,
    base_dir: Path,
    source: str = "<config>",
    *,
    run_date: datetime.date | None = None,
) -> RunConfig:
    """Validate a loaded YAML document; relative paths are taken from `base_dir`, and strftime
    fields in `output.dir` from `run_date` (today by default)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of sections")
    manifest_url = _object_url(data.get("manifest"))
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None
    manifest_path = config.manifest.path
    if not manifest_path.is_absolute():
        manifest_path = base_dir / manifest_path
    when = run_date.timetuple() if run_date is not None else time.localtime()
    out_dir = Path(time.strftime(str(config.output.dir), when))
    if not out_dir.is_absolute():
        out_dir = base_dir / out_dir
    if manifest_url is not None:
        suffix = PurePosixPath(urlsplit(manifest_url).path).suffix
        manifest_path = out_dir / f"{KEPT_MANIFEST}{suffix}"
    hook = config.webhook
    api_host = urlsplit(config.api.base_url).hostname or ""
    local_api = config.embedded_sandbox or is_loopback_host(api_host)
    if hook.enabled and hook.public_url is None and not local_api:
        raise ConfigError(
            f"invalid config {source}:\n  webhook.public_url: is required when webhook.enabled "
            "is true and api.base_url is not on this machine (the URL at which the provider "
            f"reaches this machine's receiver on {hook.listen_host}, "
            "e.g. https://hooks.example.com/wanbatch)"
        )
    manifest_path, out_dir = manifest_path.resolve(), out_dir.resolve()
    state = config.incremental.state
    if state is not None:
        state = (state if state.is_absolute() else base_dir / state).resolve()
    store = config.assets.store
    if "://" not in store:
        store = str(store if Path(store).is_absolute() else out_dir / store)
    return config.model_copy(
        update={
            "manifest": config.manifest.model_copy(
                update={"path": manifest_path, "source": manifest_url}
            ),
            "output": config.output.model_copy(update={"dir": out_dir}),
            "assets": config.assets.model_copy(update={"store": store}),
            "incremental": config.incremental.model_copy(update={"state": state}),
        }
    )


_CONFIG_LIMIT = 4_000_000  # a config larger than this is not a config


def _object_url(section: Any) -> str | None:
    """The manifest's path when it is an object URL (which a Path cannot hold), else None."""
    path = section.get("path") if isinstance(section, dict) else None
    if isinstance(path, str) and is_object_url(path):
        return path
    return None


def load_config(
    path: Path | str,
    *,
    sets: Sequence[str] = (),
    output_dir: Path | None = None,
    run_date: datetime.date | None = None,
) -> RunConfig:
    """A config file, or an object URL of one (read with the environment's credentials;
    its relative paths are then taken from the working folder), with a scheduler's overrides:
    `sets` (`key.path=value`), `output_dir` (taken from the working folder) and `run_date`."""
    where = str(path)
    if is_object_url(where):
        from pipeline.core.storage import ObjectTooLarge, read_object

        try:
            text = read_object(where, {}, _CONFIG_LIMIT).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"cannot read config {where}: it does not exist") from None
        except (ObjectTooLarge, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {where}: {exc}") from None
        base_dir = Path.cwd()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {where}: {exc.strerror}") from None
        base_dir = Path(path).resolve().parent
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        said = str(exc).replace('"<unicode string>"', where)  # PyYAML names no file
        raise ConfigError(f"config {where} is not valid YAML: {said}") from None
    if isinstance(data, dict):
        extra = [*sets, f"output.dir={output_dir.absolute()}"] if output_dir else list(sets)
        data = apply_overrides(data, extra)
    return parse_config(data, base_dir, where, run_date=run_date)
