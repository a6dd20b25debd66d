from service._gen.medvault.v1 import records_pb2 as _records_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CountRecordsRequest(_message.Message):
    __slots__ = ("period",)
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    period: str
    def __init__(self, period: _Optional[str] = ...) -> None: ...

class RecordCount(_message.Message):
    __slots__ = ("kind", "records", "suppressed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    kind: _records_pb2.RecordKind
    records: int
    suppressed: bool
    def __init__(self, kind: _Optional[_Union[_records_pb2.RecordKind, str]] = ..., records: _Optional[int] = ..., suppressed: _Optional[bool] = ...) -> None: ...

class CountRecordsResponse(_message.Message):
    __slots__ = ("period", "facility", "time_zone", "min_cell", "counts")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    FACILITY_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    MIN_CELL_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    period: str
    facility: str
    time_zone: str
    min_cell: int
    counts: _containers.RepeatedCompositeFieldContainer[RecordCount]
    def __init__(self, period: _Optional[str] = ..., facility: _Optional[str] = ..., time_zone: _Optional[str] = ..., min_cell: _Optional[int] = ..., counts: _Optional[_Iterable[_Union[RecordCount, _Mapping]]] = ...) -> None: ...
