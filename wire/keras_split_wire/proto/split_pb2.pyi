from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "codec", "scale_exponent", "scale", "zero_point", "indices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SCALE_EXPONENT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    codec: str
    scale_exponent: int
    scale: float
    zero_point: int
    indices: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., codec: _Optional[str] = ..., scale_exponent: _Optional[int] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ..., indices: _Optional[bytes] = ...) -> None: ...

class CutTensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("protocol_version", "cut", "codec", "resume_session", "client_step")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_STEP_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    cut: _containers.RepeatedCompositeFieldContainer[CutTensorSpec]
    codec: str
    resume_session: str
    client_step: int
    def __init__(self, protocol_version: _Optional[int] = ..., cut: _Optional[_Iterable[_Union[CutTensorSpec, _Mapping]]] = ..., codec: _Optional[str] = ..., resume_session: _Optional[str] = ..., client_step: _Optional[int] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ("session_id", "protocol_version", "last_step", "max_batch_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    protocol_version: int
    last_step: int
    max_batch_size: int
    def __init__(self, session_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., last_step: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step", "mode", "activations", "labels", "labels_are_dict", "sample_weight", "reset_metrics", "trace")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_ARE_DICT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESET_METRICS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    mode: str
    activations: _containers.RepeatedCompositeFieldContainer[Tensor]
    labels: _containers.RepeatedCompositeFieldContainer[Tensor]
    labels_are_dict: bool
    sample_weight: _containers.RepeatedCompositeFieldContainer[Tensor]
    reset_metrics: bool
    trace: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., mode: _Optional[str] = ..., activations: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., labels: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., labels_are_dict: bool = ..., sample_weight: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., reset_metrics: bool = ..., trace: _Optional[str] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("step", "gradients", "logs", "outputs", "outputs_are_dict", "log_order")
    class LogsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_ARE_DICT_FIELD_NUMBER: _ClassVar[int]
    LOG_ORDER_FIELD_NUMBER: _ClassVar[int]
    step: int
    gradients: _containers.RepeatedCompositeFieldContainer[Tensor]
    logs: _containers.ScalarMap[str, float]
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    outputs_are_dict: bool
    log_order: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., gradients: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., logs: _Optional[_Mapping[str, float]] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., outputs_are_dict: bool = ..., log_order: _Optional[_Iterable[str]] = ...) -> None: ...

class TurnRequest(_message.Message):
    __slots__ = ("session_id", "round")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class TurnReply(_message.Message):
    __slots__ = ("go", "round", "weights", "finished")
    GO_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    go: bool
    round: int
    weights: _containers.RepeatedCompositeFieldContainer[Tensor]
    finished: bool
    def __init__(self, go: bool = ..., round: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., finished: bool = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("session_id", "round", "weights", "samples")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    weights: _containers.RepeatedCompositeFieldContainer[Tensor]
    samples: int
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., samples: _Optional[int] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...
