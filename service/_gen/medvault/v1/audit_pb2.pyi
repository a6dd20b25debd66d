import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from service._gen.medvault.v1 import records_pb2 as _records_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ALLOWED: _ClassVar[Outcome]
    OUTCOME_DENIED: _ClassVar[Outcome]
    OUTCOME_FAILED: _ClassVar[Outcome]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    EXPORT_FORMAT_JSONL: _ClassVar[ExportFormat]
    EXPORT_FORMAT_CSV: _ClassVar[ExportFormat]
    EXPORT_FORMAT_FHIR: _ClassVar[ExportFormat]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ALLOWED: Outcome
OUTCOME_DENIED: Outcome
OUTCOME_FAILED: Outcome
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
EXPORT_FORMAT_JSONL: ExportFormat
EXPORT_FORMAT_CSV: ExportFormat
EXPORT_FORMAT_FHIR: ExportFormat

class AuditEvent(_message.Message):
    __slots__ = ("sequence", "time", "principal", "application", "role", "action", "resource", "patient_index", "outcome", "status", "reason", "source", "prev_hash", "hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    APPLICATION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    PATIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    principal: str
    application: str
    role: str
    action: str
    resource: str
    patient_index: str
    outcome: Outcome
    status: str
    reason: str
    source: str
    prev_hash: bytes
    hash: bytes
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., application: _Optional[str] = ..., role: _Optional[str] = ..., action: _Optional[str] = ..., resource: _Optional[str] = ..., patient_index: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., source: _Optional[str] = ..., prev_hash: _Optional[bytes] = ..., hash: _Optional[bytes] = ...) -> None: ...

class QueryEventsRequest(_message.Message):
    __slots__ = ("since", "until", "principal", "patient", "action", "outcome", "limit")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    principal: str
    patient: _records_pb2.PatientId
    action: str
    outcome: Outcome
    limit: int
    def __init__(self, since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., patient: _Optional[_Union[_records_pb2.PatientId, _Mapping]] = ..., action: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class VerifyChainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyChainResponse(_message.Message):
    __slots__ = ("ok", "events_checked", "checkpoints_checked", "first_bad_sequence", "reason", "last_checkpoint_sequence")
    OK_FIELD_NUMBER: _ClassVar[int]
    EVENTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    events_checked: int
    checkpoints_checked: int
    first_bad_sequence: int
    reason: str
    last_checkpoint_sequence: int
    def __init__(self, ok: _Optional[bool] = ..., events_checked: _Optional[int] = ..., checkpoints_checked: _Optional[int] = ..., first_bad_sequence: _Optional[int] = ..., reason: _Optional[str] = ..., last_checkpoint_sequence: _Optional[int] = ...) -> None: ...

class ExportEventsRequest(_message.Message):
    __slots__ = ("query", "format")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    query: QueryEventsRequest
    format: ExportFormat
    def __init__(self, query: _Optional[_Union[QueryEventsRequest, _Mapping]] = ..., format: _Optional[_Union[ExportFormat, str]] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class BreakGlassReviewItem(_message.Message):
    __slots__ = ("event", "grant_id", "reviewed", "reviewed_by", "reviewed_at", "comment")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_BY_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_AT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    event: AuditEvent
    grant_id: str
    reviewed: bool
    reviewed_by: str
    reviewed_at: _timestamp_pb2.Timestamp
    comment: str
    def __init__(self, event: _Optional[_Union[AuditEvent, _Mapping]] = ..., grant_id: _Optional[str] = ..., reviewed: _Optional[bool] = ..., reviewed_by: _Optional[str] = ..., reviewed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., comment: _Optional[str] = ...) -> None: ...

class ListBreakGlassRequest(_message.Message):
    __slots__ = ("include_reviewed",)
    INCLUDE_REVIEWED_FIELD_NUMBER: _ClassVar[int]
    include_reviewed: bool
    def __init__(self, include_reviewed: _Optional[bool] = ...) -> None: ...

class ListBreakGlassResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BreakGlassReviewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BreakGlassReviewItem, _Mapping]]] = ...) -> None: ...

class ReviewBreakGlassRequest(_message.Message):
    __slots__ = ("grant_id", "comment")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    comment: str
    def __init__(self, grant_id: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...
