"""Parameters, inventories and settings of the storage plugin (the manual's names)."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from agent.models import CreateParams, WireModel
from agent.validation import full_match

UUID_RE = r"^[0-9a-fA-F]{32}$|^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
TIB = 1 << 40
_NAME = r"[A-Za-z0-9_+@=,-][A-Za-z0-9._+@=,-]*"
SAFE_REL_PATH_RE = re.compile(rf"{_NAME}(?:/{_NAME})*")

SHARED_FS_TYPES = ["nfs", "nfs4", "cifs", "smb3", "ceph", "fuse.ceph", "fuse.cephfs", "glusterfs",
                   "fuse.glusterfs", "ocfs2", "gfs2", "lustre", "gpfs", "beegfs", "fuse.moosefs",
                   "fuse.mfs", "fuse.juicefs", "virtiofs", "9p"]


def norm_uuid(v: str) -> str:
    return v.replace("-", "").lower()


def _hex_digest(v: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}|[0-9a-fA-F]{64}", v):
        raise ValueError("must be a hex md5 (32 digits) or sha256 (64 digits)")
    return v.lower()


# A checksum as the manual gives it: hex md5 or sha256, either case; kept in lower case.
HexDigest = Annotated[str, AfterValidator(_hex_digest)]


class StorageSettings(WireModel):
    """The [storage] config section."""
    mount_command: list[str] = Field(["mount"], min_length=1,
                                     description="argv prefix of the NFS mount: + -t nfs -o OPTS URL PATH")
    umount_command: list[str] = Field(["umount"], min_length=1, description="argv prefix of unmounts")
    nfs_default_options: str = Field("soft,timeo=100,retrans=3,nosuid,nodev",
                                     description="added to mountOptions unless they set the same key")
    nfs_mount_root: str | None = Field(None, description="where NFS exports are mounted without "
                                                          "a mountPath; default <state dir>/mnt")
    shared_fs_types: list[str] = Field(SHARED_FS_TYPES, description="filesystem types a shared "
                                                                    "mount point may be on")
    call_timeout_seconds: float = Field(10.0, gt=0, le=600, description="bound of one filesystem call")
    probe_interval_seconds: float = Field(30.0, gt=0, le=3600)
    probe_timeout_seconds: float = Field(10.0, gt=0, le=600)
    max_stuck_helpers: int = Field(2, ge=1, le=64, description="abandoned helpers per storage "
                                                              "before calls fail at once")
    mount_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    qemu_img_timeout_seconds: float = Field(3600.0, gt=0)
    max_volume_bytes: int = Field(256 * TIB, gt=0, description="larger sizes are refused")
    download_timeout_seconds: float = Field(6 * 3600.0, gt=0)
    download_stall_seconds: float = Field(120.0, gt=0, description="no data for this long fails")
    migration_timeout_seconds: float = Field(24 * 3600.0, gt=0)
    migration_stall_seconds: float = Field(120.0, gt=0)
    migration_checksum: Literal["xxh3_128", "sha256", "sha1", "sha512", "blake2b", "md5"] = "xxh3_128"
    tls_ca_file: str | None = Field(None, description="CA bundle for https downloads and migrations")
    export_base_url: str | None = Field(None, pattern=r"^https?://[A-Za-z0-9.\[\]:-]+$",
                                        description="base of image store export URLs, e.g. "
                                                    "http://10.0.0.5:7070; else from [server]")

    @field_validator("nfs_mount_root", "tls_ca_file")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isabs(v):
            raise ValueError("must be an absolute path")
        return v


# --- primary storage ---------------------------------------------------------------

class _AddBase(CreateParams):
    name: str = Field("", max_length=255)
    description: str | None = Field(None, max_length=2048)
    zone_uuid: str | None = Field(None, pattern=UUID_RE)
    type: str | None = Field(None, description="ignored: the URL says the type")
    url: str = Field(min_length=1, max_length=4096)


class AddLocalPrimaryStorage(_AddBase):
    """url: a directory of this node (made when missing) under [storage] allowed_roots,
    symlinks resolved; else 400 SYS.1007."""


class AddNfsPrimaryStorage(_AddBase):
    """url: server:/export; mounted at mountPath (default under [storage] nfs_mount_root),
    which must lie under [storage] allowed_roots, symlinks resolved; else 400 SYS.1007."""
    mount_path: str | None = Field(None, max_length=4096)
    mount_options: str | None = Field(None, max_length=1024,
                                      description="comma-separated NFS mount options")


class AddSmpPrimaryStorage(_AddBase):
    """url: a directory on a mounted shared filesystem, under [storage] allowed_roots
    (symlinks resolved); else 400 SYS.1007."""
    allow_local_filesystem: bool = Field(False, description="accept a local filesystem (tests, "
                                                            "single-node setups)")


class PrimaryStorageInventory(WireModel):
    uuid: str
    zone_uuid: str | None = None
    name: str
    url: str
    description: str | None = None
    total_capacity: int | None = None
    available_capacity: int | None = None
    total_physical_capacity: int | None = None
    available_physical_capacity: int | None = None
    system_used_capacity: int | None = None
    type: str = Field(description="LocalStorage, NFS or SharedMountPoint")
    state: str = Field(description="Enabled, Disabled or Maintenance")
    status: str = Field(description="Connected, Connecting, Hung or Disconnected")
    status_reason: str | None = None
    mount_path: str
    mount_options: str | None = None
    create_date: str
    last_op_date: str
    attached_cluster_uuids: list[str] = []


class PrimaryStorageReply(WireModel):
    inventory: PrimaryStorageInventory


class Capacity(WireModel):
    total_capacity: int
    available_capacity: int
    total_physical_capacity: int
    available_physical_capacity: int


class HostDiskCapacity(Capacity):
    host_uuid: str


class HostDiskCapacities(WireModel):
    inventories: list[HostDiskCapacity]


class PrimaryStorageTypes(WireModel):
    primary_storage_types: list[str]


class ChangePrimaryStorageState(WireModel):
    state_event: Literal["enable", "disable", "maintain", "Enabled", "Disabled", "Maintenance"]


class DeleteParams(WireModel):
    delete_mode: Literal["Permissive", "Enforcing"] = "Permissive"


class CleanUpResult(WireModel):
    removed_image_uuids: list[str]
    removed_bytes: int
    kept_image_uuids: list[str]


# --- volumes -------------------------------------------------------------------------

class CreateVolume(CreateParams):
    name: str = Field("", max_length=255)
    description: str | None = Field(None, max_length=2048)
    format: Literal["qcow2", "raw"] = "qcow2"
    size: int | None = Field(None, description="bytes (virtual); required without imageUuid")
    image_uuid: str | None = Field(None, pattern=UUID_RE, description="a cached image: the backing "
                                                                       "file (qcow2) or the source (raw)")
    path: str | None = Field(None, max_length=1024, description="relative to the storage root; "
                                                                "default volumes/<uuid>.<format>")
    type: Literal["Root", "Data"] = "Data"

    @field_validator("path")
    @classmethod
    def _safe_names(cls, v: str | None) -> str | None:
        # The install path goes back to the controller and into argv: plain names only.
        if v is not None and not full_match(SAFE_REL_PATH_RE, v):
            raise ValueError("must be a relative path of names made of letters, digits and "
                             "'_', '-', '+', '@', '=', ',', '.' (not starting with '.')")
        return v


class BackingFile(WireModel):
    filename: str
    format: str | None = None
    virtual_size: int | None = None
    actual_size: int | None = None


class VolumeInventory(WireModel):
    uuid: str
    name: str
    description: str | None = None
    primary_storage_uuid: str
    vm_instance_uuid: str | None = None
    disk_offering_uuid: str | None = None
    root_image_uuid: str | None = None
    install_path: str = Field(description="absolute path on this node")
    path: str = Field(description="relative to the storage root")
    type: str
    format: str
    size: int = Field(description="virtual size, bytes")
    actual_size: int | None = Field(None, description="bytes allocated on the storage")
    backing_file: str | None = None
    backing_chain: list[BackingFile] | None = None
    state: str = "Enabled"
    status: str = "Ready"
    create_date: str
    last_op_date: str
    is_shareable: bool = False


class VolumeReply(WireModel):
    inventory: VolumeInventory


class ResizeVolume(WireModel):
    size: int = Field(description="the new virtual size in bytes; grow only")


class MigrationDestination(WireModel):
    primary_storage_uuid: str = Field(pattern=UUID_RE)
    url: str | None = Field(None, max_length=2048, description="the destination agent, e.g. "
                                                               "https://node2:7070; absent: this node")
    token: str | None = Field(None, max_length=4096, description="the destination agent's API token")
    tls_verify: bool = True


class MigrateVolume(WireModel):
    destination: MigrationDestination | None = None
    dst_primary_storage_uuid: str | None = Field(None, pattern=UUID_RE,
                                                 description="the manual's name: this node")
    backing_chain: Literal["flatten", "carry"] = Field(
        "flatten", description="flatten: one self-contained image; carry: copy the cached "
                               "backing image too (when missing) and keep the chain")


# --- image cache -----------------------------------------------------------------------

class DownloadImage(WireModel):
    image_uuid: str = Field(pattern=UUID_RE)
    url: str = Field(min_length=1, max_length=4096, description="http:// or https://")
    checksum: HexDigest | None = Field(None, description="hex digest of the file")
    checksum_type: Literal["md5", "sha256"] | None = None
    md5sum: HexDigest | None = Field(None, description="the manual's md5 field; same as checksum+md5")


class ImageCacheInventory(WireModel):
    uuid: str = Field(description="the image's uuid")
    primary_storage_uuid: str
    url: str | None = None
    path: str
    install_path: str
    format: str
    size: int = Field(description="virtual size")
    actual_size: int
    checksum: str | None = None
    checksum_type: str | None = None
    md5sum: str | None = None
    sha256: str | None = None
    create_date: str


class ImageCacheReply(WireModel):
    inventory: ImageCacheInventory
