import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KekVersion(_message.Message):
    __slots__ = ("version", "state", "wrapped_keys", "created_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEYS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: str
    wrapped_keys: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., state: _Optional[str] = ..., wrapped_keys: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RotateKekRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKekResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: KekVersion
    def __init__(self, created: _Optional[_Union[KekVersion, _Mapping]] = ...) -> None: ...

class ListKeksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeksResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[KekVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[KekVersion, _Mapping]]] = ...) -> None: ...

class RewrapRequest(_message.Message):
    __slots__ = ("from_version", "batch_size")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    batch_size: int
    def __init__(self, from_version: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class RewrapProgress(_message.Message):
    __slots__ = ("rewrapped", "remaining", "target_version")
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    rewrapped: int
    remaining: int
    target_version: int
    def __init__(self, rewrapped: _Optional[int] = ..., remaining: _Optional[int] = ..., target_version: _Optional[int] = ...) -> None: ...

class RetireKekRequest(_message.Message):
    __slots__ = ("version", "destroy_key")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DESTROY_KEY_FIELD_NUMBER: _ClassVar[int]
    version: int
    destroy_key: bool
    def __init__(self, version: _Optional[int] = ..., destroy_key: _Optional[bool] = ...) -> None: ...

class Signer(_message.Message):
    __slots__ = ("name", "key_type", "certificate_subject", "not_after")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_type: str
    certificate_subject: str
    not_after: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., key_type: _Optional[str] = ..., certificate_subject: _Optional[str] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSignersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSignersResponse(_message.Message):
    __slots__ = ("signers",)
    SIGNERS_FIELD_NUMBER: _ClassVar[int]
    signers: _containers.RepeatedCompositeFieldContainer[Signer]
    def __init__(self, signers: _Optional[_Iterable[_Union[Signer, _Mapping]]] = ...) -> None: ...

class CreateSignerRequest(_message.Message):
    __slots__ = ("name", "rsa", "subject")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RSA_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    name: str
    rsa: bool
    subject: str
    def __init__(self, name: _Optional[str] = ..., rsa: _Optional[bool] = ..., subject: _Optional[str] = ...) -> None: ...

class CreateSignerResponse(_message.Message):
    __slots__ = ("created", "csr_pem")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    created: bool
    csr_pem: bytes
    def __init__(self, created: _Optional[bool] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class ImportCertificateRequest(_message.Message):
    __slots__ = ("name", "certificate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    certificate: bytes
    def __init__(self, name: _Optional[str] = ..., certificate: _Optional[bytes] = ...) -> None: ...
