"""libvirt's errors as the agent's VM.* codes, in plain words, without tracebacks.

| Code | Status | When |
|---|---|---|
| VM.1001 | 400 | a parameter the node refuses (a disk file missing, a malformed uuid) |
| VM.1002 | 503 | libvirt refused the definition (XML, configuration) |
| VM.1004 | 404 | no such VM on this node |
| VM.1009 | 409 | the VM is in the wrong state for the operation |
| VM.1010 | 409 | a VM with that uuid or name already exists |
| VM.1011 | 409 | the VM is busy with another operation (a migration) |
| VM.1408 | 503 | libvirt did not answer in time, or a VM job timed out |
| VM.1500 | 503 | libvirt failed the operation |
| VM.1501 | 503 | not supported by this hypervisor |
| VM.1503 | 503 | libvirt is unreachable |
| VM.1601 | 503 | the migration failed |
| VM.1602 | 503 | the migration was aborted |
"""

from __future__ import annotations

from agent import errors

from agent.libvirt_conn import libvirt   # None without the binding: the plugin says why


def message(e: BaseException) -> str:
    if libvirt is not None and isinstance(e, libvirt.libvirtError):
        return (e.get_error_message() or str(e)).strip()
    return str(e).strip()


def is_code(e: BaseException, *names: str) -> bool:
    if libvirt is None or not isinstance(e, libvirt.libvirtError):
        return False
    code = e.get_error_code()
    return any(getattr(libvirt, n, None) == code for n in names)


def to_api(e: BaseException, what: str, uuid: str | None = None) -> errors.ApiError:
    """An exception from a libvirt call made to `what` ("start the VM") as an ApiError."""
    if isinstance(e, errors.Timeout):
        return errors.Timeout(f"libvirt did not answer in time when asked to {what}; "
                              "the VM or libvirtd may be busy, try again later",
                              code="VM.1408", details=e.description)
    if isinstance(e, errors.ApiError):
        return e
    msg = message(e)
    if libvirt is None or not isinstance(e, libvirt.libvirtError):
        return errors.OperationFailed(f"could not {what}: {type(e).__name__}: {msg}", code="VM.1500")
    if is_code(e, "VIR_ERR_NO_DOMAIN"):
        return errors.NotFound(f"no VM {uuid} on this node" if uuid else f"no such VM: {msg}",
                               code="VM.1004")
    if is_code(e, "VIR_ERR_OPERATION_INVALID"):
        return errors.Conflict(f"cannot {what}: {msg}", code="VM.1009")
    if is_code(e, "VIR_ERR_DOM_EXIST"):
        return errors.Conflict(f"cannot {what}: {msg}", code="VM.1010")
    if is_code(e, "VIR_ERR_OPERATION_TIMEOUT", "VIR_ERR_AGENT_UNRESPONSIVE"):
        return errors.Timeout(f"cannot {what}: {msg}; the VM is busy, try again later",
                              code="VM.1408")
    if is_code(e, "VIR_ERR_OPERATION_ABORTED"):
        return errors.OperationFailed(f"cannot {what}: the operation was aborted ({msg})",
                                      code="VM.1602")
    if is_code(e, "VIR_ERR_XML_ERROR", "VIR_ERR_XML_DETAIL", "VIR_ERR_CONFIG_UNSUPPORTED",
               "VIR_ERR_INVALID_ARG"):
        return errors.OperationFailed(f"libvirt refused to {what}: {msg}", code="VM.1002")
    if is_code(e, "VIR_ERR_NO_SUPPORT", "VIR_ERR_ARGUMENT_UNSUPPORTED"):
        return errors.OperationFailed(f"cannot {what}: not supported here ({msg})", code="VM.1501")
    if is_code(e, "VIR_ERR_MIGRATE_PERSIST_FAILED", "VIR_ERR_MIGRATE_UNSAFE",
               "VIR_ERR_MIGRATE_FINISH_OK"):
        return errors.OperationFailed(f"cannot {what}: {msg}", code="VM.1601")
    return errors.OperationFailed(f"libvirt failed to {what}: {msg}", code="VM.1500")
