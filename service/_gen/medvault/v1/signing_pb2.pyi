import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SignatureFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNATURE_FORMAT_UNSPECIFIED: _ClassVar[SignatureFormat]
    SIGNATURE_FORMAT_CADES_DETACHED: _ClassVar[SignatureFormat]
    SIGNATURE_FORMAT_PADES: _ClassVar[SignatureFormat]
SIGNATURE_FORMAT_UNSPECIFIED: SignatureFormat
SIGNATURE_FORMAT_CADES_DETACHED: SignatureFormat
SIGNATURE_FORMAT_PADES: SignatureFormat

class SignRecordRequest(_message.Message):
    __slots__ = ("record_id", "version", "signer", "format")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    version: int
    signer: str
    format: SignatureFormat
    def __init__(self, record_id: _Optional[str] = ..., version: _Optional[int] = ..., signer: _Optional[str] = ..., format: _Optional[_Union[SignatureFormat, str]] = ...) -> None: ...

class SignatureInfo(_message.Message):
    __slots__ = ("id", "record_id", "version", "signer", "certificate_subject", "signing_time", "algorithm", "format")
    ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SIGNING_TIME_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    id: str
    record_id: str
    version: int
    signer: str
    certificate_subject: str
    signing_time: _timestamp_pb2.Timestamp
    algorithm: str
    format: SignatureFormat
    def __init__(self, id: _Optional[str] = ..., record_id: _Optional[str] = ..., version: _Optional[int] = ..., signer: _Optional[str] = ..., certificate_subject: _Optional[str] = ..., signing_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., algorithm: _Optional[str] = ..., format: _Optional[_Union[SignatureFormat, str]] = ...) -> None: ...

class VerifyRecordRequest(_message.Message):
    __slots__ = ("record_id", "version")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    version: int
    def __init__(self, record_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SignatureVerification(_message.Message):
    __slots__ = ("signature", "valid", "reason")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    signature: SignatureInfo
    valid: bool
    reason: str
    def __init__(self, signature: _Optional[_Union[SignatureInfo, _Mapping]] = ..., valid: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class VerifyRecordResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SignatureVerification]
    def __init__(self, results: _Optional[_Iterable[_Union[SignatureVerification, _Mapping]]] = ...) -> None: ...

class GetSignatureRequest(_message.Message):
    __slots__ = ("signature_id",)
    SIGNATURE_ID_FIELD_NUMBER: _ClassVar[int]
    signature_id: str
    def __init__(self, signature_id: _Optional[str] = ...) -> None: ...

class GetSignatureResponse(_message.Message):
    __slots__ = ("signature", "p7s")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    P7S_FIELD_NUMBER: _ClassVar[int]
    signature: SignatureInfo
    p7s: bytes
    def __init__(self, signature: _Optional[_Union[SignatureInfo, _Mapping]] = ..., p7s: _Optional[bytes] = ...) -> None: ...
