"""The DICOM network service (issue #11, item 3): C-ECHO, C-STORE, C-FIND and C-GET on TLS
with client certificates, over the same records use case and access guard as gRPC."""

from service.dicom.listener import DicomListener

__all__ = ["DicomListener"]
