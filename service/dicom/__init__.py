"""The DICOM network service (issue #11, item 3): C-ECHO, C-STORE, C-FIND and C-GET on TLS
with client certificates, over the same records use case and access guard as gRPC.

Imported only when a listener is configured (or by ``medvault import-dicom``), so
pydicom's read-time validation is switched off here too, as in
``storage/formats/dicom.py``: it would warn with the offending value quoted, patient
data in the service's log, before any record validator had loaded that module.
"""

from pydicom import config as _pydicom_config

from service.dicom.listener import DicomListener

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE

__all__ = ["DicomListener"]
