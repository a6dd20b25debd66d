import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_KIND_UNSPECIFIED: _ClassVar[RecordKind]
    RECORD_KIND_HL7V2: _ClassVar[RecordKind]
    RECORD_KIND_CDA: _ClassVar[RecordKind]
    RECORD_KIND_FHIR: _ClassVar[RecordKind]
    RECORD_KIND_DICOM: _ClassVar[RecordKind]
    RECORD_KIND_PDF: _ClassVar[RecordKind]
    RECORD_KIND_OTHER: _ClassVar[RecordKind]
RECORD_KIND_UNSPECIFIED: RecordKind
RECORD_KIND_HL7V2: RecordKind
RECORD_KIND_CDA: RecordKind
RECORD_KIND_FHIR: RecordKind
RECORD_KIND_DICOM: RecordKind
RECORD_KIND_PDF: RecordKind
RECORD_KIND_OTHER: RecordKind

class PatientId(_message.Message):
    __slots__ = ("id", "assigning_authority")
    ID_FIELD_NUMBER: _ClassVar[int]
    ASSIGNING_AUTHORITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    assigning_authority: str
    def __init__(self, id: _Optional[str] = ..., assigning_authority: _Optional[str] = ...) -> None: ...

class RecordHeader(_message.Message):
    __slots__ = ("patient", "kind", "content_type", "title", "supersedes", "supersedes_version", "expected_sha256", "request_id")
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    patient: PatientId
    kind: RecordKind
    content_type: str
    title: str
    supersedes: str
    supersedes_version: int
    expected_sha256: bytes
    request_id: str
    def __init__(self, patient: _Optional[_Union[PatientId, _Mapping]] = ..., kind: _Optional[_Union[RecordKind, str]] = ..., content_type: _Optional[str] = ..., title: _Optional[str] = ..., supersedes: _Optional[str] = ..., supersedes_version: _Optional[int] = ..., expected_sha256: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class PutRecordRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: RecordHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[RecordHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("id", "version", "patient", "kind", "content_type", "title", "size", "stored_size", "sha256", "created_at", "created_by", "supersedes_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    patient: PatientId
    kind: RecordKind
    content_type: str
    title: str
    size: int
    stored_size: int
    sha256: bytes
    created_at: _timestamp_pb2.Timestamp
    created_by: str
    supersedes_version: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., patient: _Optional[_Union[PatientId, _Mapping]] = ..., kind: _Optional[_Union[RecordKind, str]] = ..., content_type: _Optional[str] = ..., title: _Optional[str] = ..., size: _Optional[int] = ..., stored_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., supersedes_version: _Optional[int] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("id", "version", "range")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    range: ByteRange
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., range: _Optional[_Union[ByteRange, _Mapping]] = ...) -> None: ...

class GetRecordResponse(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: Record
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[Record, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class StatRecordRequest(_message.Message):
    __slots__ = ("id", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListRecordsRequest(_message.Message):
    __slots__ = ("patient", "kind", "created_after", "created_before", "page_size", "page_token", "all_versions", "document_code", "study_uid", "series_uid", "modality", "observation_code", "date_from", "date_to")
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_CODE_FIELD_NUMBER: _ClassVar[int]
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_CODE_FIELD_NUMBER: _ClassVar[int]
    DATE_FROM_FIELD_NUMBER: _ClassVar[int]
    DATE_TO_FIELD_NUMBER: _ClassVar[int]
    patient: PatientId
    kind: RecordKind
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    all_versions: bool
    document_code: str
    study_uid: str
    series_uid: str
    modality: str
    observation_code: str
    date_from: str
    date_to: str
    def __init__(self, patient: _Optional[_Union[PatientId, _Mapping]] = ..., kind: _Optional[_Union[RecordKind, str]] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., all_versions: _Optional[bool] = ..., document_code: _Optional[str] = ..., study_uid: _Optional[str] = ..., series_uid: _Optional[str] = ..., modality: _Optional[str] = ..., observation_code: _Optional[str] = ..., date_from: _Optional[str] = ..., date_to: _Optional[str] = ...) -> None: ...

class ListRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListStudiesRequest(_message.Message):
    __slots__ = ("patient",)
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    patient: PatientId
    def __init__(self, patient: _Optional[_Union[PatientId, _Mapping]] = ...) -> None: ...

class Study(_message.Message):
    __slots__ = ("study_uid", "study_date", "modalities", "series_count", "instance_count")
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    STUDY_DATE_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    SERIES_COUNT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    study_uid: str
    study_date: str
    modalities: _containers.RepeatedScalarFieldContainer[str]
    series_count: int
    instance_count: int
    def __init__(self, study_uid: _Optional[str] = ..., study_date: _Optional[str] = ..., modalities: _Optional[_Iterable[str]] = ..., series_count: _Optional[int] = ..., instance_count: _Optional[int] = ...) -> None: ...

class ListStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[Study]
    def __init__(self, studies: _Optional[_Iterable[_Union[Study, _Mapping]]] = ...) -> None: ...

class GetStudyRequest(_message.Message):
    __slots__ = ("study_uid",)
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    study_uid: str
    def __init__(self, study_uid: _Optional[str] = ...) -> None: ...

class StudyInstance(_message.Message):
    __slots__ = ("record", "series_uid", "sop_instance_uid")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    record: Record
    series_uid: str
    sop_instance_uid: str
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ..., series_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ...) -> None: ...

class GetStudyResponse(_message.Message):
    __slots__ = ("instance", "chunk")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    instance: StudyInstance
    chunk: bytes
    def __init__(self, instance: _Optional[_Union[StudyInstance, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
