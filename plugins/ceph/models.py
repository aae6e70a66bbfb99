"""The Ceph plugin's wire models: parameters, inventories, results.

Field names follow the manual's inventories (CephPrimaryStorageInventory,
CephPrimaryStoragePoolInventory, CephBackupStorageInventory, mons) where it has
them; what the manual lacks (health, quorum, volumes, images) is named in the
same style.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.models import CreateParams, WireModel, resource_uuid_field
from agent.validation import ResourceUuid, full_match

from . import secrets
from .cluster import parse_mon_url

UUID_RE = re.compile(r"^[0-9a-f]{32}$")
# Ceph accepts nearly anything in a pool name and rbd nearly anything in an image
# name ('/' and '@' included), but '/' and '@' break every "pool/image@snap" spec
# and rbd: URL.  The agent allows what is safe everywhere.
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
NAME_RULE = ("letters, digits, '_', '.' and '-', at most 128, not starting with '.' or '-'")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
MAX_PG = 65536   # Ceph's mon_max_pool_pg_num default


def check_name(kind: str, value: str) -> str:
    if not full_match(NAME_RE, value):
        raise ValueError(f"{kind} name '{value[:140]}' is not allowed: use {NAME_RULE}")
    return value


def check_uuid(value: str) -> str:
    v = value.replace("-", "").lower()
    if not full_match(UUID_RE, v):
        raise ValueError("must be a UUID: 32 hex digits (dashes allowed)")
    return v


class _Registration(CreateParams):
    name: str = Field("", max_length=255)
    description: str | None = Field(None, max_length=2048)
    mon_urls: list[str] = Field(default_factory=list, max_length=32,
                                description="host, host:port, v1:/v2:host:port, or the manual's "
                                "user:password@host/?monPort=N (the ssh part is ignored)")
    user: str = Field("admin", description="the cephx user, without 'client.'")
    key: str | None = Field(None, description="the user's cephx key; stored 0600, never returned")
    keyring_path: str | None = Field(None, description="a keyring file on this node, used in place")
    conf_path: str | None = Field(None, description="a ceph.conf on this node (mon_host when "
                                  "monUrls is empty, and other client options)")
    url: str | None = Field(None, description="not used (the manual's field)")
    type: str | None = Field(None, description="'Ceph' if given")
    zone_uuid: str | None = None
    import_images: bool = Field(False, description="the manual's field; not used")

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        v = v.removeprefix("client.")
        if not full_match(USER_RE, v):
            raise ValueError("user must be a cephx user name such as 'admin' (letters, digits, "
                             "'_', '.', '-')")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is None:
            return None
        why = secrets.check_key(v)
        if why:
            raise ValueError(why)
        return v.strip()

    @field_validator("mon_urls")
    @classmethod
    def _mons(cls, v: list[str]) -> list[str]:
        for url in v:
            parse_mon_url(url)      # raises ValueError naming the URL (without a password)
        return v

    @field_validator("type")
    @classmethod
    def _type(cls, v: str | None) -> str | None:
        if v is not None and v.lower() != "ceph":
            raise ValueError("type must be 'Ceph'")
        return v

    @model_validator(mode="after")
    def _login(self):
        if not self.key and not self.keyring_path:
            raise ValueError("give the user's key ('key') or a keyring file on this node "
                             "('keyringPath')")
        if self.key and self.keyring_path:
            raise ValueError("give either 'key' or 'keyringPath', not both")
        if not self.mon_urls and not self.conf_path:
            raise ValueError("give the mons ('monUrls') or a ceph.conf on this node ('confPath')")
        for p in (self.keyring_path, self.conf_path):
            if p is not None and not p.startswith("/"):
                raise ValueError(f"'{p[:200]}' must be an absolute path")
        return self


class AddCephPrimaryStorage(_Registration):
    root_volume_pool_name: str | None = None
    data_volume_pool_name: str | None = None
    image_cache_pool_name: str | None = None
    create_pools: bool = Field(True, description="create the missing pools (application rbd)")
    pg_num: int | None = Field(None, ge=1, le=MAX_PG, description="pg count of created pools")

    @field_validator("root_volume_pool_name", "data_volume_pool_name", "image_cache_pool_name")
    @classmethod
    def _pool(cls, v: str | None) -> str | None:
        return None if v is None else check_name("pool", v)


class AddCephBackupStorage(_Registration):
    pool_name: str | None = None
    create_pools: bool = Field(True, description="create the pool if missing (application rbd)")
    pg_num: int | None = Field(None, ge=1, le=MAX_PG)

    @field_validator("pool_name")
    @classmethod
    def _pool(cls, v: str | None) -> str | None:
        return None if v is None else check_name("pool", v)


class HealthCheck(WireModel):
    name: str
    severity: str
    summary: str


class MonInventory(WireModel):
    mon_uuid: str
    primary_storage_uuid: str | None = None
    backup_storage_uuid: str | None = None
    hostname: str
    mon_port: int | None = None
    mon_addr: str = Field(description="host:port as the agent dials it")
    protocol: str | None = Field(None, description="v1, v2 or null (either)")
    status: str = Field(description="Connected (in quorum), Disconnected or Unknown")
    in_quorum: bool | None = None
    in_monmap: bool | None = None
    mon_name: str | None = Field(None, description="the mon's name in the live monmap")
    create_date: str
    last_op_date: str


class _StorageInventory(WireModel):
    uuid: str
    name: str
    description: str | None = None
    url: str
    type: str = "Ceph"
    state: str = "Enabled"
    status: str = Field(description="Connected, Disconnected or Connecting")
    status_reason: str | None = None
    health: str | None = Field(None, description="HEALTH_OK, HEALTH_WARN, HEALTH_ERR")
    health_checks: list[HealthCheck] = []
    fsid: str
    user: str
    total_capacity: int | None = None
    available_capacity: int | None = None
    mons: list[MonInventory] = []
    create_date: str
    last_op_date: str
    last_checked_date: str | None = None


class CephPrimaryStorageInventory(_StorageInventory):
    zone_uuid: str | None = None
    root_volume_pool_name: str
    data_volume_pool_name: str
    image_cache_pool_name: str
    total_physical_capacity: int | None = None
    available_physical_capacity: int | None = None
    system_used_capacity: int | None = None
    mount_path: str | None = None
    attached_cluster_uuids: list[str] = []


class CephBackupStorageInventory(_StorageInventory):
    pool_name: str
    attached_zone_uuids: list[str] = []


class PrimaryReply(WireModel):
    inventory: CephPrimaryStorageInventory


class BackupReply(WireModel):
    inventory: CephBackupStorageInventory


class Empty(WireModel):
    pass


class CleanUpResult(WireModel):
    """cleanUpImageCacheOnPrimaryStorage: the images removed from (and kept in) the
    storage's image cache pool; the names are the cached images' uuids."""
    removed_image_uuids: list[str]
    removed_bytes: int = Field(description="bytes the removed images had allocated")
    kept_image_uuids: list[str] = Field(description="cloned from, open, or a volume")


# --- capacity --------------------------------------------------------------------------

class PoolCapacity(WireModel):
    pool_name: str
    pool_uuid: str | None = None
    type: str | None = None
    reported: bool = Field(description="the mgr reports stats for it (false for a pool that "
                           "does not exist, or was created a moment ago)")
    stored: int | None = Field(None, description="bytes of user data")
    objects: int | None = None
    used_bytes: int | None = Field(None, description="raw bytes used, replicas included")
    max_available: int | None = Field(None, description="bytes that can still be written")
    percent_used: float | None = None
    quota_bytes: int | None = Field(None, description="0 = no quota")
    quota_objects: int | None = None


class Capacity(WireModel):
    total_capacity: int
    available_capacity: int
    total_physical_capacity: int
    available_physical_capacity: int
    used_capacity: int
    pools: list[PoolCapacity]


# --- pools -----------------------------------------------------------------------------

class PoolStats(WireModel):
    stored: int
    objects: int
    used_bytes: int
    max_available: int
    percent_used: float


class PoolInventory(WireModel):
    uuid: str
    primary_storage_uuid: str | None = None
    backup_storage_uuid: str | None = None
    pool_name: str
    alias_name: str | None = None
    description: str | None = None
    type: str = Field(description="Root, Data or ImageCache (the storage's), or Data")
    create_date: str
    last_op_date: str
    exists: bool | None = Field(None, description="the pool exists in the cluster now")
    pool_id: int | None = None
    pg_num: int | None = None
    replicated_size: int | None = None
    min_size: int | None = None
    quota_bytes: int | None = None
    quota_objects: int | None = None
    applications: list[str] = []
    stats: PoolStats | None = Field(None, description="only on a single pool's GET")


class PoolReply(WireModel):
    inventory: PoolInventory


class AddPool(CreateParams):
    pool_name: str
    alias_name: str | None = Field(None, max_length=255)
    description: str | None = Field(None, max_length=2048)
    is_create: bool = Field(True, description="create it (true) or adopt an existing one (false)")
    type: Literal["Data", "Root", "ImageCache"] = "Data"
    pg_num: int | None = Field(None, ge=1, le=MAX_PG, description=f"1-{MAX_PG}; the cluster's "
                               "default when absent")

    @field_validator("pool_name")
    @classmethod
    def _pool(cls, v: str) -> str:
        return check_name("pool", v)


class UpdatePool(WireModel):
    alias_name: str | None = Field(None, max_length=255)
    description: str | None = Field(None, max_length=2048)
    quota_bytes: int | None = Field(None, ge=0, description="0 removes the quota")
    quota_objects: int | None = Field(None, ge=0, description="0 removes the quota")


class DeletePoolQuery(WireModel):
    force: bool = Field(False, description="delete even while it holds images")
    keep: bool = Field(False, description="only forget the pool; leave it in the cluster")


# --- mons ------------------------------------------------------------------------------

class AddMons(WireModel):
    mon_urls: list[str] = Field(min_length=1, max_length=32)

    @field_validator("mon_urls")
    @classmethod
    def _mons(cls, v: list[str]) -> list[str]:
        for url in v:
            parse_mon_url(url)
        return v


class RemoveMonsQuery(WireModel):
    mon_hostnames: str = Field(description="comma-separated hostnames, host:port or mon uuids")


class UpdateMon(WireModel):
    hostname: str | None = None
    mon_port: int | None = Field(None, ge=1, le=65535)
    ssh_username: str | None = Field(None, description="not used (the agent runs on the node)")
    ssh_password: str | None = Field(None, description="not used, never stored")
    ssh_port: int | None = Field(None, description="not used")

    @field_validator("hostname")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None:
            parse_mon_url(v)
        return v


class MonsReply(WireModel):
    inventories: list[MonInventory]


# --- RBD volumes -----------------------------------------------------------------------

class ParentRef(WireModel):
    pool_name: str
    image_name: str
    snapshot_name: str


class SnapshotInfo(WireModel):
    name: str
    id: int
    size: int
    protected: bool
    children: list[str] = Field([], description="pool/image of the clones of this snapshot")
    create_date: str | None = None


class VolumeInventory(WireModel):
    uuid: str
    primary_storage_uuid: str
    pool_name: str
    name: str = Field(description="the RBD image's name")
    install_path: str = Field(description="ceph://pool/image")
    size: int
    actual_size: int | None = Field(None, description="bytes allocated (single GET only)")
    format: str = "raw"
    object_size: int | None = None
    features: list[str] = []
    parent: ParentRef | None = None
    snapshots: list[SnapshotInfo] = []
    create_date: str | None = None
    last_op_date: str | None = None


class VolumeReply(WireModel):
    inventory: VolumeInventory


class _ImagePlace(WireModel):
    """Where a new RBD image goes: each part checked when given."""
    name: str | None = None
    pool_name: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else check_name("image", v)

    @field_validator("pool_name")
    @classmethod
    def _pool(cls, v: str | None) -> str | None:
        return None if v is None else check_name("pool", v)



class NewImage(_ImagePlace):
    volume_uuid: str | None = None

    @field_validator("volume_uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        return None if v is None else check_uuid(v)

class CreateVolume(CreateParams, _ImagePlace):
    resource_uuid: ResourceUuid | None = resource_uuid_field("uuid", "volumeUuid")
    name: str | None = Field(None, description="the image's name; the volume uuid when absent")
    pool_name: str | None = Field(None, description="one of the storage's pools; the data pool "
                                  "(or the root pool for type Root) when absent")
    type: Literal["Root", "Data"] = "Data"
    size: int = Field(gt=0, le=1 << 60, description="bytes")


class DeleteVolumeQuery(WireModel):
    force: bool = Field(False, description="also remove snapshots, flattening their clones first")


class ResizeVolume(WireModel):
    size: int = Field(gt=0, le=1 << 60)
    allow_shrink: bool = False


class SnapshotParams(WireModel):
    snapshot_name: str

    @field_validator("snapshot_name")
    @classmethod
    def _snap(cls, v: str) -> str:
        return check_name("snapshot", v)


class CreateSnapshot(SnapshotParams):
    protect: bool = False


class DeleteSnapshot(SnapshotParams):
    force: bool = Field(False, description="unprotect it, flattening its clones first")


class CloneVolume(SnapshotParams, NewImage):
    pass


class Deleted(WireModel):
    uuid: str
    deleted: bool = True


# --- backup storage images -------------------------------------------------------------

class ImageInventory(WireModel):
    uuid: str
    backup_storage_uuid: str
    name: str | None = None
    pool_name: str
    install_path: str = Field(description="ceph://pool/image")
    url: str | None = Field(None, description="where it was downloaded from (no credentials)")
    size: int | None = Field(None, description="virtual size in bytes")
    actual_size: int | None = Field(None, description="bytes downloaded")
    format: str = "raw"
    original_format: str | None = Field(None, description="raw or qcow2, as downloaded")
    md5sum: str | None = None
    checksum: str | None = Field(None, description="algorithm:hex of the downloaded bytes")
    status: str = Field(description="Downloading, Ready or Failed")
    create_date: str
    last_op_date: str


class ImageReply(WireModel):
    inventory: ImageInventory


_URL_RE = re.compile(r"(?P<scheme>https?)://(?:[^@/?#]*@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#\[\]@]+)"
                     r"(?::(?P<port>[0-9]{1,5}))?(?P<rest>[/?#].*)?", re.I | re.S)
_HOST_NAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
                           r"(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.?")


def check_image_url(v: str) -> str:
    """An image URL parsed whole: http(s), a host name or IP, an optional port 1-65535,
    no whitespace or control character anywhere (encode them as %XX), no '.' or '..'
    path segment.  Credentials may be given (never stored or shown)."""
    if re.search(r"[\x00-\x20\x7f-\x9f]", v):
        raise ValueError("url must not contain spaces or control characters (percent-encode them)")
    m = _URL_RE.fullmatch(v)
    if not m:
        raise ValueError("url must be an http:// or https:// URL with a host")
    host, port = m.group("host"), m.group("port")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"url: '{host[:100]}' is not an IPv6 address") from None
    elif not _HOST_NAME_RE.fullmatch(host):
        raise ValueError(f"url: '{host[:100]}' is not a host name or an IP address")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"url: port {port} is out of range 1-65535")
    path = re.split(r"[?#]", m.group("rest") or "", maxsplit=1)[0]
    if any(seg in (".", "..") for seg in path.split("/")):
        raise ValueError("url must not have a '.' or '..' path segment")
    return v


class AddImage(CreateParams):
    resource_uuid: ResourceUuid | None = resource_uuid_field("uuid", "imageUuid")
    url: str = Field(min_length=1, max_length=4096, description="http(s) URL of the image")
    name: str | None = Field(None, max_length=255)
    format: Literal["auto", "raw", "qcow2"] = "auto"
    md5sum: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")
    checksum: str | None = Field(None, description="md5:, sha1:, sha256: or sha512: then hex")
    timeout: int = Field(3600, ge=1, le=7 * 86400, description="seconds for the whole import")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_image_url(v)

    @field_validator("checksum")
    @classmethod
    def _checksum(cls, v: str | None) -> str | None:
        if v is None:
            return None
        m = re.fullmatch(r"(md5|sha1|sha256|sha512):([0-9a-fA-F]+)", v)
        lengths = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
        if not m or len(m.group(2)) != lengths[m.group(1)]:
            raise ValueError("checksum must be md5:<32 hex>, sha1:<40 hex>, sha256:<64 hex> "
                             "or sha512:<128 hex>")
        return f"{m.group(1)}:{m.group(2).lower()}"


class ExportImage(WireModel):
    expire_seconds: int = Field(86400, ge=60, le=30 * 86400)


class ExportReply(WireModel):
    image_url: str = Field(description="GET it (no token header needed; the URL is the secret)")
    export_md5_sum: str | None = None
    expire_date: str
    size: int


class MigrateImage(WireModel):
    destination: str | None = Field(None, description="uuid of another backup storage of this "
                                    "node: Ceph, or any kind that imports images (an image store)")
    destination_backup_storage_uuid: str | None = Field(None, description="alias of destination")
    backup_storage_uuid: str | None = Field(None, description="alias of destination (the image "
                                            "store's migrateImage name)")
    delete_source: bool = False

    @field_validator("destination", "destination_backup_storage_uuid", "backup_storage_uuid")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        return None if v is None else check_uuid(v)

    @model_validator(mode="after")
    def _one(self):
        given = {v for v in (self.destination, self.destination_backup_storage_uuid,
                             self.backup_storage_uuid) if v}
        if not given:
            raise ValueError("give the destination backup storage's uuid ('destination')")
        if len(given) > 1:
            raise ValueError("destination, destinationBackupStorageUuid and backupStorageUuid "
                             "disagree")
        return self

    @property
    def target(self) -> str:
        return self.destination or self.destination_backup_storage_uuid or \
            self.backup_storage_uuid or ""


class DeleteImageQuery(WireModel):
    force: bool = Field(False, description="also remove its snapshots")


class StoragesDeleted(WireModel):
    uuid: str
    deleted: bool = True
