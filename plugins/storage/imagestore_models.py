"""Parameters and inventories of the image store backup storage (the manual's names)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent import errors
from agent.models import CreateParams, WireModel, resource_uuid_field
from agent.validation import ResourceUuid

from .models import UUID_RE, HexDigest

IMAGE_STORE = "ImageStoreBackupStorage"


# --- parameters and inventories ----------------------------------------------------------------

class AddImageStoreBackupStorage(CreateParams):
    """url: a directory of this node (made when missing) under [storage] allowed_roots,
    reached without a symlink; resourceUuid (or uuid): the core's rule, a uuid of any
    storage of this node is a 409."""
    name: str = Field("", max_length=255)
    description: str | None = Field(None, max_length=2048)
    url: str = Field(min_length=1, max_length=4096)
    hostname: str | None = Field(None, max_length=255, description="kept as data (the manual's)")
    username: str | None = Field(None, max_length=255, description="kept as data")
    password: str | None = Field(None, max_length=255, exclude=True,
                                 description="accepted for the manual's sake, never stored")
    ssh_port: int | None = Field(None, ge=1, le=65535, description="ignored")
    type: str | None = None
    zone_uuid: str | None = Field(None, pattern=UUID_RE)


class ImageStoreInventory(WireModel):
    uuid: str
    name: str
    description: str | None = None
    url: str
    hostname: str | None = None
    username: str | None = None
    type: str = IMAGE_STORE
    state: str
    status: str
    status_reason: str | None = None
    total_capacity: int | None = None
    available_capacity: int | None = None
    total_physical_capacity: int | None = None
    available_physical_capacity: int | None = None
    used_capacity: int | None = Field(None, description="bytes of the store's blobs")
    create_date: str
    last_op_date: str


class ImageStoreReply(WireModel):
    inventory: ImageStoreInventory


class AddStoreImage(CreateParams):
    """resourceUuid (or imageUuid, uuid): the core's rule, an image of this store is a 409."""
    resource_uuid: ResourceUuid | None = resource_uuid_field("uuid", "imageUuid")
    name: str = Field("", max_length=255)
    description: str | None = Field(None, max_length=2048)
    url: str = Field(min_length=1, max_length=4096, description="http://, https:// or file:///path")
    checksum: HexDigest | None = Field(None, description="hex md5 (32 digits) or sha256 (64)")
    checksum_type: Literal["md5", "sha256"] | None = None
    md5sum: HexDigest | None = None
    sha256: HexDigest | None = None
    format: str | None = Field(None, description="ignored: qemu-img says the format")

    def wanted(self) -> tuple[str | None, str | None]:
        """(sha256, md5) the content must have."""
        sha = self.sha256
        md5 = self.md5sum
        if self.checksum:
            kind = self.checksum_type or ("md5" if len(self.checksum) == 32 else "sha256")
            if (kind == "md5") != (len(self.checksum) == 32):
                raise errors.BadRequest(f"a {kind} checksum has {32 if kind == 'md5' else 64} hex "
                                        "digits", code="STORAGE.1001")
            if kind == "md5":
                if md5 and md5 != self.checksum:
                    raise errors.BadRequest("md5sum and checksum disagree", code="STORAGE.1001")
                md5 = self.checksum
            else:
                if sha and sha != self.checksum:
                    raise errors.BadRequest("sha256 and checksum disagree", code="STORAGE.1001")
                sha = self.checksum
        elif self.checksum_type:
            raise errors.BadRequest("checksumType needs a checksum", code="STORAGE.1001")
        if sha is not None and len(sha) != 64:
            raise errors.BadRequest("sha256 has 64 hex digits", code="STORAGE.1001")
        if md5 is not None and len(md5) != 32:
            raise errors.BadRequest("md5sum has 32 hex digits", code="STORAGE.1001")
        return sha, md5


class StoreImageInventory(WireModel):
    uuid: str
    backup_storage_uuid: str
    name: str
    description: str | None = None
    url: str | None = None
    format: str
    size: int
    actual_size: int
    sha256: str
    md5sum: str | None = None
    install_path: str
    status: str = "Ready"
    create_date: str


class StoreImageReply(WireModel):
    inventory: StoreImageInventory


class ExportParams(WireModel):
    expire_seconds: int = Field(24 * 3600, ge=60, le=30 * 24 * 3600,
                                description="how long the URL works")


class ExportReply(WireModel):
    image_url: str
    expire_date: str


class UpdateImageStore(WireModel):
    name: str | None = Field(None, max_length=255)
    description: str | None = Field(None, max_length=2048)
    hostname: str | None = Field(None, max_length=255)
    username: str | None = Field(None, max_length=255)
