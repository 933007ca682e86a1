"""The node's configuration: one TOML file, overridden by ``PACS_NODE__SECTION__KEY`` environment variables.

Every value has a default that runs a working node on one machine (SQLite and the instance store under
``node.data_dir``, the demo model bundle, CPU), so ``pacs-node serve`` needs no file at all. Unknown keys
are errors rather than silently ignored: a misspelt ``max_atempts`` in a hospital's config must not fall
back to a default nobody chose. Errors name the key (``node.port: ...``) so the fix is obvious.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, SecretStr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipelines.constants import CHEXPERT_LABELS
from storage.queue import RetryPolicy

#: Where ``pacs-node`` looks for its config file when neither ``--config`` nor ``PACS_NODE_CONFIG`` says.
DEFAULT_CONFIG_FILE = Path("pacs-node.toml")
ENV_PREFIX = "PACS_NODE__"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of the default repertoire, no '\'


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a DICOM AE title (1-16 printable characters, no backslash)")
    return value.strip()


AETitle = Annotated[str, Field(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]
Probability = Annotated[float, Field(ge=0, le=1)]
#: One of the 14 CheXpert findings the pipeline classifies.
FindingLabel = Literal[CHEXPERT_LABELS]  # type: ignore[valid-type]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(Section):
    """TLS for an association with a peer; paths are PEM files. ``cert_file``/``key_file`` are ours,
    for a peer that wants mutual TLS."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Password of an encrypted ``key_file`` (never logged or printed).
    key_password: SecretStr | None = None
    #: Check that the peer's certificate names ``host`` (turn off only for certificates without it).
    check_hostname: bool = True


def _process_count(value: object) -> int | Literal["auto"]:
    """A number of processes >= 1 (a string of digits too: environment overrides are strings) or ``auto``,
    refused in one message (a union type's error names each of its branches, not the key)."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f'a number of processes >= 1 or "auto", not {value!r}')


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process can use: those its affinity allows (``taskset``, a cpuset), and no more than
    its cgroup's CPU quota (a container given 2 CPUs of a 64-core host sees 64 in ``os.cpu_count()``: as
    many listener processes as that would only take turns on its 2). cgroup v2 (``cpu.max``) and v1
    (``cpu.cfs_quota_us``), on the process's own group and the groups above it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return max(cpus, 1)
    for line in lines:
        hierarchy, _, controllers_path = line.partition(":")
        controllers, _, path = controllers_path.partition(":")
        if hierarchy == "0" and not controllers:
            base, files = cgroup_root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = cgroup_root / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        group = base / path.lstrip("/")
        while True:
            quota = _cgroup_cpu_quota(group, files)
            if quota is not None:
                cpus = min(cpus, quota)
            if group == base or base not in group.parents:
                break
            group = group.parent
    return max(cpus, 1)


def _cgroup_cpu_quota(group: Path, files: tuple[str, ...]) -> int | None:
    """CPUs a cgroup's quota allows (rounded up), or None where it sets none (or it cannot be read)."""
    try:
        if len(files) == 1:  # v2: "max 100000" or "200000 100000"
            quota_text, period_text = (group / files[0]).read_text().split()[:2]
        else:
            quota_text, period_text = ((group / name).read_text().strip() for name in files)
        if quota_text in ("max", "-1"):
            return None
        quota, period = int(quota_text), int(period_text)
    except (OSError, ValueError):
        return None
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


class ListenerTLSConfig(Section):
    """DICOM TLS on the listener's port (``[node.tls]``): every association must be TLS then."""

    cert_file: Path
    key_file: Path
    #: Password of an encrypted ``key_file`` (never logged or printed).
    key_password: SecretStr | None = None
    #: When set, callers must present a certificate signed by this CA (mutual TLS).
    ca_file: Path | None = None


class NodeConfig(Section):
    ae_title: AETitle = "PACSNODE"
    port: Port = 11112
    bind: str = "0.0.0.0"
    data_dir: Path = Path("var")
    #: Largest PDU we accept; large PDUs mean fewer, bigger writes of the dataset to disk.
    max_pdu: Annotated[int, Field(ge=0)] = 4 * 1024 * 1024
    #: Concurrent associations the listener serves.
    max_associations: Annotated[int, Field(ge=1)] = 16
    #: Connections that have not yet sent a whole A-ASSOCIATE-RQ, held apart from the associations (they
    #: never use an association slot); past this many the oldest is closed for the newcomer.
    max_pending_connections: Annotated[int, Field(ge=1, le=10000)] = 64
    #: Longest a connection may take from connecting to the last byte of its A-ASSOCIATE-RQ (TLS
    #: handshake included); a real peer needs milliseconds.
    request_deadline_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    #: Longest one PDU may take to arrive once its first byte has (a 4 MiB PDU at 70 kB/s).
    pdu_deadline_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    #: Reject associations whose called AE title is not ``ae_title`` (A-ASSOCIATE-RJ, reason 7).
    check_called_ae: bool = True
    #: Processes accepting associations on ``port`` (``SO_REUSEPORT``; the kernel spreads connections
    #: over them), each filing what it receives durably on its own. ``auto``: one per two CPUs this process
    #: may use (:func:`usable_cpus`: affinity and cgroup quota, not the host's count), at most 8; 1 on 2
    #: CPUs, where with the CPUs busy (workers, other load) each extra process raised the CPU per instance
    #: (4 associations of tiny instances, load 14: 4.35-4.64 ms with 1, 5.5 with 2, 6.0 with 4).
    listener_processes: Annotated[int | Literal["auto"], PlainValidator(_process_count)] = 1
    #: DICOM TLS for every association on ``port``; absent means plain TCP.
    tls: ListenerTLSConfig | None = None

    def listener_process_count(self) -> int:
        """``listener_processes`` as a number (``auto`` resolved on this machine: :func:`usable_cpus`)."""
        if self.listener_processes == "auto":
            return max(1, min(usable_cpus() // 2, 8))
        return self.listener_processes

    _ae = field_validator("ae_title")(_check_ae_title)


class Service(StrEnum):
    """What a caller may ask of the node (C-ECHO is always allowed to whoever may associate)."""

    STORE = "store"
    FIND = "find"
    MOVE = "move"
    GET = "get"


class AllowedCaller(Section):
    """A calling AE that may associate; ``host`` (an IP address) pins it to one machine. ``services``
    are what it may ask for; ``move_destinations`` the peer names its C-MOVEs may name (empty: any
    configured peer)."""

    ae_title: AETitle
    host: str | None = None
    services: list[Service] = Field(default_factory=lambda: list(Service))
    move_destinations: list[str] = Field(default_factory=list)

    _ae = field_validator("ae_title")(_check_ae_title)


class RetryConfig(Section):
    """How a failed job is retried: ``attempts`` in all, the first retry after ``first_delay_s``, each next
    delay ``growth`` times longer, never longer than ``max_delay_s`` (each delay jittered into its upper half)."""

    attempts: Annotated[int, Field(ge=1)] = 5
    first_delay_s: Annotated[float, Field(ge=0)] = 10.0
    growth: Annotated[float, Field(ge=1)] = 2.0
    max_delay_s: Annotated[float, Field(gt=0)] = 600.0

    @model_validator(mode="after")
    def _cap(self) -> RetryConfig:
        if self.max_delay_s < self.first_delay_s:
            raise ValueError("max_delay_s: must be at least first_delay_s")
        return self

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.attempts, self.first_delay_s, self.growth, self.max_delay_s)


#: Export retries by default outlast a day-long outage of the PACS: 10 s, 20 s, ... up to 30 min apart,
#: 80 attempts (about 36 hours). A peer marked down spends no attempts at all until it answers again.
EXPORT_RETRY = {"attempts": 80, "first_delay_s": 10.0, "growth": 2.0, "max_delay_s": 1800.0}

class DicomWebAuth(Section):
    """How the node authenticates to a DICOMweb peer: a bearer token, or HTTP basic (both never logged)."""

    bearer_token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> DicomWebAuth:
        if self.bearer_token is not None and self.username is not None:
            raise ValueError("give either bearer_token or username/password, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self


class Peer(Section):
    """A node we send to (or echo): a PACS, a viewer, a modality's result receiver. A DIMSE peer has
    ``ae_title``/``host``/``port``; a DICOMweb peer has ``url`` (the base that ``/studies`` is appended to,
    e.g. ``https://pacs/dicom-web``) and gets its results by STOW-RS."""

    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    tls: TLSConfig | None = None
    #: This peer's own retry policy for results sent to it (default: ``export.retry``).
    retry: RetryConfig | None = None
    #: Transfer syntax UID to send in when the peer accepts it (e.g. a lossless one it decodes fastest);
    #: otherwise the stored one, else whatever the peer accepts, transcoded.
    transfer_syntax: str | None = None
    #: After results are delivered, ask this peer for storage commitment (PS3.4 Annex J) and record its
    #: answer per delivery; the peer reports back to our AE, so it must know our address.
    storage_commitment: bool = False

    @field_validator("transfer_syntax")
    @classmethod
    def _transfer_syntax(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from pydicom.uid import UID

        if not UID(v).is_transfer_syntax:
            raise ValueError(f"{v!r} is not a transfer syntax UID pydicom knows")
        return v
    url: str | None = None
    auth: DicomWebAuth | None = None
    #: PEM bundle that signs the DICOMweb server's certificate (default: the system's trust store).
    ca_file: Path | None = None

    _ae = field_validator("ae_title")(lambda v: v if v is None else _check_ae_title(v))

    @model_validator(mode="after")
    def _kind(self) -> Peer:
        if self.url is None:
            missing = [key for key in ("ae_title", "host", "port") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"{missing[0]}: missing (a DIMSE peer needs ae_title, host and port; "
                                 "a DICOMweb peer needs url)")
        else:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url: {self.url!r} is not an http:// or https:// URL")
            if self.host is not None or self.port is not None or self.tls is not None:
                raise ValueError("a DICOMweb peer (url) takes auth and ca_file, not host, port or tls")
        return self

    @property
    def is_dicomweb(self) -> bool:
        return self.url is not None

    def describe(self) -> str:
        """Where the peer is, for messages (no credentials)."""
        return self.url if self.url is not None else f"{self.ae_title}@{self.host}:{self.port}"


class RoutingRule(Section):
    """Send results for instances matching every given field to ``destinations`` (peer names).
    Fields left out match anything; matching is exact, case-insensitive for modality and AE titles."""

    calling_ae: str | None = None
    modality: str | None = None
    station_name: str | None = None
    destinations: list[str] = Field(min_length=1)
    #: Settle time of studies from matching senders (seconds), instead of ``studies.settle_s``: a room
    #: that sends each image as it is taken wants longer than a PACS that forwards whole studies.
    settle_s: Annotated[float, Field(ge=0, le=86400)] | None = None


class RoutingConfig(Section):
    rules: list[RoutingRule] = Field(default_factory=list)
    #: When no rule matches: ``sender`` returns results to the peer whose AE title is the calling AE
    #: (if one is configured); ``none`` keeps them only in the node (Q/R can still fetch them).
    default: str = "sender"
    #: Peer names that get every result, whatever the rules say (an archive, a research copy).
    always: list[str] = Field(default_factory=list)

    @field_validator("default")
    @classmethod
    def _default(cls, v: str) -> str:
        if v not in ("sender", "none"):
            raise ValueError("must be 'sender' or 'none'")
        return v


class DatabaseConfig(Section):
    #: SQLAlchemy URL; empty means a SQLite file ``node.sqlite3`` under ``node.data_dir``.
    url: str = ""


class StoreConfig(Section):
    #: Directory of the instance store; empty means ``store/`` under ``node.data_dir``.
    path: Path | None = None
    #: Refuse new instances (status 0xA700) when the store's filesystem has less free space than this.
    min_free_bytes: Annotated[int, Field(ge=0)] = 1024**3


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class PipelineConfig(Section):
    #: A model bundle directory, or ``fake`` for the deterministic test double; empty means the demo bundle.
    bundle: str = ""
    device: Device = Device.AUTO
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    #: Longest a claimed job waits for its batch to fill before the batch runs anyway. 0: a batch is what
    #: is due when the worker looks; under load the queue fills while the previous batch runs, so batches
    #: still fill, and a lone image at a quiet hour does not wait for company that is not coming.
    max_batch_latency_s: Annotated[float, Field(ge=0, le=60)] = 0.0
    deterministic: bool = False
    #: Only with ``bundle = "fake"``: seconds each batch of the test double takes (tests of crashes mid-job).
    fake_delay_s: Annotated[float, Field(ge=0, le=60)] = 0.0


def _legacy_attempts(data: Any, key: str) -> Any:
    """Read an older config's flat attempts key (``worker.max_attempts``, ``export.retries``) as
    ``retry.attempts``, so a working config keeps working."""
    if isinstance(data, dict) and key in data:
        data = dict(data)
        retry = dict(data.get("retry") or {})
        retry.setdefault("attempts", data.pop(key))
        data["retry"] = retry
    return data


class WorkerConfig(Section):
    #: Worker processes ``serve`` starts (0: run ``pacs-node worker`` yourself, e.g. on a GPU host).
    count: Annotated[int, Field(ge=0, le=64)] = 1
    lease_seconds: Annotated[int, Field(ge=5)] = 300
    #: Retries of a failed analysis (a missing bundle is not a failure: no job is claimed without a pipeline).
    retry: RetryConfig = Field(default_factory=RetryConfig)
    #: How often an idle worker or export thread looks for work it was not rung for (a retry whose backoff
    #: ended, a job queued by another host sharing the database); on this host a doorbell wakes it at once.
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    #: Processes that build and encode result objects beside each worker (~0.2 s of CPU per image). Unset:
    #: none when the models run on the CPU, else all cores but two (at most 16); 0 builds in the worker.
    result_processes: Annotated[int, Field(ge=0, le=64)] | None = None

    _legacy = model_validator(mode="before")(classmethod(lambda cls, data: _legacy_attempts(data, "max_attempts")))

    @property
    def max_attempts(self) -> int:
        return self.retry.attempts


class ExportConfig(Section):
    #: Retries of one result to one destination (each peer may have its own: ``peers.<name>.retry``).
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig(**EXPORT_RETRY))
    #: A destination whose sends failed this many times in a row is marked down: nothing is sent to it
    #: (no attempt spent) until a C-ECHO probe answers, then its waiting results go at once. 0: never.
    down_after_failures: Annotated[int, Field(ge=0)] = 3
    #: How often a destination marked down is probed with C-ECHO.
    probe_interval_s: Annotated[float, Field(gt=0)] = 30.0
    #: Network timeout for association and DIMSE with a peer.
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    #: Sends in flight at once (threads of ``serve``); a peer that hangs holds only one of them.
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    #: Results one thread takes at once and sends on one association per destination.
    batch_size: Annotated[int, Field(ge=1, le=1000)] = 32
    #: An association with a destination stays open this long after its last batch, for the next one
    #: (opening one per batch was most of the exporter's work at a GPU's rate); 0 closes it after each
    #: batch. At most half of ``timeout_s`` is used: pynetdicom aborts an association idle that long.
    keep_open_s: Annotated[float, Field(ge=0)] = 1.0

    _legacy = model_validator(mode="before")(classmethod(lambda cls, data: _legacy_attempts(data, "retries")))

    @property
    def retries(self) -> int:
        return self.retry.attempts


class RetentionConfig(Section):
    #: Delete instances (received and results) older than this many days; 0 keeps them for ever.
    days: Annotated[int, Field(ge=0)] = 0
    #: Delete finished (done/cancelled) jobs older than this many days.
    job_days: Annotated[int, Field(ge=1)] = 30
    #: How often housekeeping (lease reclaim, purges) runs.
    interval_s: Annotated[float, Field(gt=0)] = 30.0


class NonChestAction(StrEnum):
    KEEP = "keep"
    DISCARD = "discard"


class PolicyConfig(Section):
    #: What happens to a received instance that is not a chest radiograph: it is always acknowledged and
    #: recorded with the reason; ``keep`` also stores its file, ``discard`` does not.
    non_chest: NonChestAction = NonChestAction.KEEP
    #: Accept every storage SOP class (a PACS rule "forward everything" must not fail on an ultrasound);
    #: off: only radiograph and result classes, others refused at association time.
    any_storage_class: bool = True


class StudiesConfig(Section):
    #: A study is analysed once no instance of it has arrived for this long (seconds). A two-view chest
    #: exam is usually sent within a minute or two (PA, then the lateral, often on separate associations);
    #: 90 s waits out that gap without holding a single-image study much longer than it takes to read.
    #: An instance arriving later re-opens the study and a new report supersedes the first.
    settle_s: Annotated[float, Field(ge=0, le=86400)] = 90.0


class ResultsConfig(Section):
    """What the site says about the result objects (see :meth:`pacs_node.results.ResultOptions.from_config`)."""

    #: A finding counts as present at or above this probability (0..1); a present finding flags the
    #: image in a Key Object Selection.
    kos_threshold: Probability = 0.5
    #: Thresholds of single findings, by CheXpert label, that replace ``kos_threshold`` for them.
    per_finding_thresholds: dict[FindingLabel, Probability] = Field(default_factory=dict)
    #: Emit the Key Object Selection.
    kos: bool = True
    #: Emit a Grayscale Softcopy Presentation State with the region boxes.
    gsps: bool = True
    #: Emit the narrative report (Basic Text SR) beside the AI findings SR.
    narrative: bool = True
    #: Institution named in the result objects' equipment.
    institution_name: str | None = None
    #: This node as the device observer of the findings and the contributing equipment.
    device_name: str = "PACS-NODE"
    device_serial_number: str = "0"


class Role(StrEnum):
    READ_ONLY = "read-only"
    ADMIN = "admin"


class HttpToken(Section):
    """One credential of the HTTP interface (``[[http.tokens]]``). The secret itself is never stored:
    ``secret_hash`` is ``sha256:<hex>`` or ``pbkdf2_sha256$<iterations>$<salt>$<hex>`` (write one with
    ``pacs-node http hash-secret``). A client sends the secret as ``Authorization: Bearer <secret>`` or
    as the password of HTTP basic with ``name`` as the user; the console's login takes the same pair."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    role: Role = Role.READ_ONLY
    secret_hash: str

    @field_validator("secret_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if re.fullmatch(r"sha256:[0-9a-f]{64}", v) or re.fullmatch(r"pbkdf2_sha256\$\d+\$[^$]+\$[0-9a-f]{64}", v):
            return v
        raise ValueError("must be 'sha256:<64 hex>' or 'pbkdf2_sha256$<iterations>$<salt>$<64 hex>'")


class HttpTLSConfig(Section):
    """HTTPS on the HTTP port (``[http.tls]``); with ``ca_file`` clients must present a certificate."""

    cert_file: Path
    key_file: Path
    key_password: SecretStr | None = None
    ca_file: Path | None = None


class HttpConfig(Section):
    bind: str = "127.0.0.1"
    #: Port of ``/healthz``, ``/metrics``, DICOMweb, the admin API and the console; 0 turns it off.
    port: Annotated[int, Field(ge=0, le=65535)] = 8731
    tls: HttpTLSConfig | None = None
    tokens: list[HttpToken] = Field(default_factory=list)
    #: Largest STOW-RS request body accepted (413 beyond); it is streamed to disk, never held in memory.
    max_request_bytes: Annotated[int, Field(ge=1)] = 4 * 1024**3
    #: Connections served at once; beyond it new requests get 503 instead of exhausting the process.
    limit_concurrency: Annotated[int, Field(ge=1)] = 64
    #: An idle keep-alive connection is closed after this long.
    timeout_keep_alive_s: Annotated[float, Field(gt=0)] = 5.0
    #: A connection must deliver a request's headers within this long (slow-header clients are dropped).
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    #: Longest wait for the next piece of a request body before the request is abandoned.
    read_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    #: A console login lasts this long.
    session_minutes: Annotated[int, Field(ge=1)] = 480

    @field_validator("tokens")
    @classmethod
    def _unique(cls, v: list[HttpToken]) -> list[HttpToken]:
        names = [t.name for t in v]
        if len(names) != len(set(names)):
            raise ValueError("token names must be unique")
        return v


class LimitsConfig(Section):
    """Bounds on what a peer's dataset may cost before it is refused (status 0xC2xx)."""

    #: Largest dataset a Deflated transfer syntax may inflate to.
    max_inflated_bytes: Annotated[int, Field(ge=1024 * 1024)] = 256 * 1024 * 1024
    #: Largest inflated / deflated ratio, checked once a dataset exceeds 16 MiB inflated.
    max_inflate_ratio: Annotated[float, Field(ge=2)] = 100.0


class LoggingConfig(Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return v.upper()


class Settings(BaseSettings):
    """The whole configuration; see :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    node: NodeConfig = Field(default_factory=NodeConfig)
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    #: Allow any calling AE when ``allowed_callers`` is empty (convenient for a first run; say so in logs).
    allow_any_caller: bool = True
    #: What a caller not listed in ``allowed_callers`` may do when ``allow_any_caller`` lets it in:
    #: send images, not query or retrieve them (patient data goes only to configured callers).
    any_caller_services: list[Service] = Field(default_factory=lambda: [Service.STORE])
    peers: dict[str, Peer] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    studies: StudiesConfig = Field(default_factory=StudiesConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; the environment overrides them (first source wins).
        return env_settings, init_settings

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        for i, rule in enumerate(self.routing.rules):
            for name in rule.destinations:
                if name not in self.peers:
                    raise ValueError(f"routing.rules.{i}.destinations: unknown peer {name!r}")
        for name in self.routing.always:
            if name not in self.peers:
                raise ValueError(f"routing.always: unknown peer {name!r}")
        for i, caller in enumerate(self.allowed_callers):
            for name in caller.move_destinations:
                if name not in self.peers:
                    raise ValueError(f"allowed_callers.{i}.move_destinations: unknown peer {name!r}")
        return self

    # -- derived paths -------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir.expanduser().resolve()

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.data_dir / 'node.sqlite3'}"

    @property
    def store_path(self) -> Path:
        path = self.store.path if self.store.path is not None else self.data_dir / "store"
        return path.expanduser().resolve()

    @property
    def bundle_path(self) -> Path | None:
        """The model bundle directory, or ``None`` for the fake pipeline."""
        if self.pipeline.bundle == "fake":
            return None
        if self.pipeline.bundle:
            return Path(self.pipeline.bundle).expanduser().resolve()
        return demo_bundle_path()

    def export_retry(self, destination: str) -> RetryPolicy:
        """The retry policy of results sent to ``destination``: the peer's own, else ``export.retry``."""
        peer = self.peers.get(destination)
        return (peer.retry if peer is not None and peer.retry is not None else self.export.retry).policy()

    def peer_for_ae(self, ae_title: str) -> tuple[str, Peer] | None:
        """The configured peer whose AE title is ``ae_title`` (by :func:`peer_by_ae_title`)."""
        return peer_by_ae_title(self.peers, ae_title)


def peer_by_ae_title(peers: Mapping[str, Peer], ae_title: str) -> tuple[str, Peer] | None:
    """``(name, peer)`` of the peer called ``ae_title``: the one rule for a sender's result receiver and a
    C-MOVE destination. Surrounding spaces never count; an exact match wins, else one that differs only
    in letter case (AE titles are case-sensitive in DICOM, but PACS administrators type them either way)."""
    title = ae_title.strip()
    for exact in (True, False):
        for name, peer in peers.items():
            if peer.ae_title is None:  # a DICOMweb peer: no AE title to match
                continue
            candidate = peer.ae_title.strip()
            if candidate == title if exact else candidate.upper() == title.upper():
                return name, peer
    return None


def demo_bundle_path() -> Path:
    """The demo bundle that ships inside the ``pipelines`` package."""
    import pipelines

    return Path(pipelines.__file__).resolve().parent / "bundles" / "demo"


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line per bad key, ready for a person to read."""


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        loc = _format_loc(err["loc"])
        if err["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
            # Cross-field checks name their own key: "routing.always: unknown peer 'x'".
            if loc == "(top level)" and ": " in msg:
                loc, msg = msg.split(": ", 1)
            elif re.match(r"^[a-z_]+: ", msg):  # a section's check names its own field: "port: ..."
                field, msg = msg.split(": ", 1)
                loc = f"{loc}.{field}"
        lines.append(f"{loc}: {msg} (in {source})")
    return "\n".join(lines)


def config_path_from_env(explicit: Path | None) -> Path | None:
    """The config file to read: ``--config``, else ``$PACS_NODE_CONFIG``, else ``./pacs-node.toml`` if present."""
    if explicit is not None:
        return explicit
    env = os.environ.get("PACS_NODE_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(path: Path | None = None) -> Settings:
    """Read ``path`` (TOML; ``None`` for defaults only) and the environment; raise :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if path is not None:
        source = f"{path} or environment"
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (write one with `pacs-node config init`)") \
                from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from exc


EXAMPLE_TOML = """\
# pacs-node configuration. Every key is optional; the values shown are the defaults unless marked
# "example". Any key can be overridden by the environment: PACS_NODE__<SECTION>__<KEY>, e.g.
# PACS_NODE__NODE__PORT=104 or PACS_NODE__PIPELINE__DEVICE=cuda.

# Who may associate. With no [[allowed_callers]] and allow_any_caller = true, any AE may send to us
# (C-ECHO and what any_caller_services allows: C-STORE only, no query/retrieve of patient data);
# as soon as one [[allowed_callers]] entry exists, only listed AEs (and hosts) may.
allow_any_caller = true
any_caller_services = ["store"]

[node]
ae_title = "PACSNODE"          # our AE title (called AE for modalities and PACS)
port = 11112                   # DICOM port
bind = "0.0.0.0"               # address to listen on
data_dir = "var"               # SQLite database and instance store live here by default
max_pdu = 4194304              # largest PDU we accept (bytes)
max_associations = 16
max_pending_connections = 64   # connections still sending their A-ASSOCIATE-RQ (never use association slots)
request_deadline_s = 10.0      # connect to complete A-ASSOCIATE-RQ (TLS handshake included)
pdu_deadline_s = 60.0          # first to last byte of one PDU
check_called_ae = true         # reject a called AE title other than ae_title
listener_processes = 1         # processes accepting on the port (SO_REUSEPORT), or "auto"
# [node.tls]                   # example: DICOM TLS on the port above (mutual TLS when ca_file is set)
# cert_file = "/etc/pacs-node/node.pem"
# key_file = "/etc/pacs-node/node.key"
# key_password = "..."         # only for an encrypted key; never logged
# ca_file = "/etc/pacs-node/callers-ca.pem"

# Peers we send results to (and can echo): [peers.<name>]
# [peers.pacs]                 # example
# ae_title = "MAINPACS"
# host = "10.1.0.10"
# port = 104
# tls = { ca_file = "/etc/pacs-node/ca.pem", cert_file = "/etc/pacs-node/node.pem",
#         key_file = "/etc/pacs-node/node.key" }
# retry = { attempts = 200, first_delay_s = 30, growth = 2, max_delay_s = 3600 }  # this peer's own policy
# transfer_syntax = "1.2.840.10008.1.2.4.80"   # preferred when the peer accepts it (here JPEG-LS lossless)

# [[allowed_callers]]          # example
# ae_title = "CR_ROOM1"
# host = "10.1.2.3"            # optional: only from this address
# services = ["store"]         # default all of store, find, move, get; a modality needs only store
# move_destinations = ["pacs"] # peers its C-MOVEs may name (default: any configured peer)

[routing]
default = "sender"             # no rule matched: back to the peer whose AE title is the caller's ("none": keep only)
always = []                    # peer names that receive every result, e.g. ["archive"]
# [[routing.rules]]            # example: first matching rules win, all of them are used
# calling_ae = "CR_ROOM1"
# modality = "CR"
# station_name = "ER-XRAY"
# destinations = ["pacs"]
# settle_s = 300               # example: this sender's studies settle after 5 minutes instead

[database]
url = ""                       # empty: sqlite file under data_dir; or "postgresql+psycopg://user@host/db"

[store]
# path = "/srv/pacs-node/store"  # default: <data_dir>/store
min_free_bytes = 1073741824    # below this free space new instances are refused with 0xA700

[pipeline]
bundle = ""                    # model bundle directory; empty = the demo bundle; "fake" = test double
device = "auto"                # auto | cpu | cuda
batch_size = 4
max_batch_latency_s = 0.0      # a batch waits at most this long to fill (0: run what is due now)
deterministic = false

[worker]
count = 1                      # worker processes started by `serve` (0 = run `pacs-node worker` yourself)
lease_seconds = 300            # a job whose worker stops heartbeating comes back after this
retry = { attempts = 5, first_delay_s = 10.0, growth = 2.0, max_delay_s = 600.0 }  # failed analyses
poll_interval_s = 0.5          # idle re-check; new work on this host rings a doorbell instead
# result_processes = 8         # builders of result objects per worker (unset: 0 on CPU, cores - 2 on a GPU)

[export]
# per result and destination: 10 s, 20 s, ... 30 min apart, 80 attempts (~36 h: a day-long outage)
retry = { attempts = 80, first_delay_s = 10.0, growth = 2.0, max_delay_s = 1800.0 }
down_after_failures = 3        # consecutive failed sends that mark a destination down (0 = never)
probe_interval_s = 30.0        # C-ECHO of a down destination; when it answers its results go at once
timeout_s = 30.0
concurrency = 4                # sends in flight at once
batch_size = 32                # results sent on one association per destination, at most

[retention]
days = 0                       # delete instances and results older than this; 0 = keep for ever
job_days = 30                  # delete finished jobs older than this
interval_s = 30.0              # housekeeping period

[policy]
non_chest = "keep"             # keep | discard: file of instances that are not chest radiographs
any_storage_class = true       # accept (and record as not processed) any storage SOP class, e.g. ultrasound

[studies]
settle_s = 90.0                # a study is analysed once no instance of it arrived for this long

[results]
kos_threshold = 0.5            # a finding is present at this probability (and flags the image in a KOS)
kos = true                     # Key Object Selection of flagged images
gsps = true                    # presentation state with region boxes
narrative = true               # narrative report SR beside the AI findings SR
# institution_name = "General Hospital"   # example
device_name = "PACS-NODE"      # device observer and contributing equipment of the results
device_serial_number = "0"
# [results.per_finding_thresholds]        # example: report a pneumothorax already at 0.2
# Pneumothorax = 0.2

# [peers.cloud]                # example: a DICOMweb archive; results go by STOW-RS
# url = "https://archive.example.org/dicom-web"
# ca_file = "/etc/pacs-node/archive-ca.pem"
# auth = { bearer_token = "..." }          # or { username = "node", password = "..." }

[http]
bind = "127.0.0.1"             # /healthz, /metrics, /dicom-web, /api, the console
port = 8731                    # 0 = off
max_request_bytes = 4294967296 # largest STOW-RS request (streamed to disk)
limit_concurrency = 64
timeout_keep_alive_s = 5.0
header_timeout_s = 10.0
read_timeout_s = 30.0
# [http.tls]                   # example: HTTPS
# cert_file = "/etc/pacs-node/web.pem"
# key_file = "/etc/pacs-node/web.key"
# [[http.tokens]]              # example; secret_hash from `pacs-node http hash-secret`
# name = "radiology-admin"
# role = "admin"               # admin | read-only
# secret_hash = "pbkdf2_sha256$600000$..."

[limits]
max_inflated_bytes = 268435456 # a Deflated dataset inflating past this is refused (0xC2xx)
max_inflate_ratio = 100.0      # ... or inflating more than this many times its size (past 16 MiB)

[logging]
level = "INFO"                 # DEBUG lets pynetdicom and highdicom log patient data (it says so)
"""
