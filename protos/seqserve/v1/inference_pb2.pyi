from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "float_data", "int64_data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FLOAT_DATA_FIELD_NUMBER: _ClassVar[int]
    INT64_DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    float_data: _containers.RepeatedScalarFieldContainer[float]
    int64_data: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., float_data: _Optional[_Iterable[float]] = ..., int64_data: _Optional[_Iterable[int]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "version", "available_versions", "task", "cell", "can_stream", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    CAN_STREAM_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    task: str
    cell: str
    can_stream: bool
    ready: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., available_versions: _Optional[_Iterable[int]] = ..., task: _Optional[str] = ..., cell: _Optional[str] = ..., can_stream: _Optional[bool] = ..., ready: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelMetadataRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelMetadataResponse(_message.Message):
    __slots__ = ("name", "version", "task", "cell", "layers", "hidden", "directions", "input_kind", "input_features", "output_kind", "output_size", "output_names", "labels", "can_stream", "accepts_text", "content_hash", "ort_provider", "cell_device", "metadata_json", "vocab")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAN_STREAM_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    ORT_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    CELL_DEVICE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    task: str
    cell: str
    layers: int
    hidden: int
    directions: int
    input_kind: str
    input_features: int
    output_kind: str
    output_size: int
    output_names: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    can_stream: bool
    accepts_text: bool
    content_hash: str
    ort_provider: str
    cell_device: str
    metadata_json: str
    vocab: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., task: _Optional[str] = ..., cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., directions: _Optional[int] = ..., input_kind: _Optional[str] = ..., input_features: _Optional[int] = ..., output_kind: _Optional[str] = ..., output_size: _Optional[int] = ..., output_names: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ..., can_stream: _Optional[bool] = ..., accepts_text: _Optional[bool] = ..., content_hash: _Optional[str] = ..., ort_provider: _Optional[str] = ..., cell_device: _Optional[str] = ..., metadata_json: _Optional[str] = ..., vocab: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "x", "h0", "c0", "text")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    H0_FIELD_NUMBER: _ClassVar[int]
    C0_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    x: Tensor
    h0: Tensor
    c0: Tensor
    text: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., h0: _Optional[_Union[Tensor, _Mapping]] = ..., c0: _Optional[_Union[Tensor, _Mapping]] = ..., text: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "y", "hn", "cn", "lengths")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    HN_FIELD_NUMBER: _ClassVar[int]
    CN_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    y: Tensor
    hn: Tensor
    cn: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., y: _Optional[_Union[Tensor, _Mapping]] = ..., hn: _Optional[_Union[Tensor, _Mapping]] = ..., cn: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("model", "version", "sequence_id", "sequence_key", "x", "start", "end", "text", "expected_position")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_KEY_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sequence_id: int
    sequence_key: str
    x: Tensor
    start: bool
    end: bool
    text: str
    expected_position: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sequence_id: _Optional[int] = ..., sequence_key: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[bool] = ..., end: _Optional[bool] = ..., text: _Optional[str] = ..., expected_position: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("y", "position", "code", "error")
    Y_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    position: int
    code: int
    error: str
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class StreamStepsRequest(_message.Message):
    __slots__ = ("steps", "batch")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    batch: SessionBatch
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ..., batch: _Optional[_Union[SessionBatch, _Mapping]] = ...) -> None: ...

class StreamStepsResponse(_message.Message):
    __slots__ = ("results", "batch")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepResponse]
    batch: SessionBatchResult
    def __init__(self, results: _Optional[_Iterable[_Union[StepResponse, _Mapping]]] = ..., batch: _Optional[_Union[SessionBatchResult, _Mapping]] = ...) -> None: ...

class SessionBatch(_message.Message):
    __slots__ = ("model", "version", "sequence_ids", "sequence_keys", "x", "start", "end", "expected_positions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_KEYS_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sequence_ids: _containers.RepeatedScalarFieldContainer[int]
    sequence_keys: _containers.RepeatedScalarFieldContainer[str]
    x: Tensor
    start: _containers.RepeatedScalarFieldContainer[bool]
    end: _containers.RepeatedScalarFieldContainer[bool]
    expected_positions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sequence_ids: _Optional[_Iterable[int]] = ..., sequence_keys: _Optional[_Iterable[str]] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., start: _Optional[_Iterable[bool]] = ..., end: _Optional[_Iterable[bool]] = ..., expected_positions: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionBatchResult(_message.Message):
    __slots__ = ("y", "positions", "codes", "errors")
    Y_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    positions: _containers.RepeatedScalarFieldContainer[int]
    codes: _containers.RepeatedScalarFieldContainer[int]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., positions: _Optional[_Iterable[int]] = ..., codes: _Optional[_Iterable[int]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("model", "version", "sequence_id", "sequence_key", "steps", "x", "commit", "temperature", "top_k", "seed")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_KEY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sequence_id: int
    sequence_key: str
    steps: int
    x: Tensor
    commit: bool
    temperature: float
    top_k: int
    seed: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sequence_id: _Optional[int] = ..., sequence_key: _Optional[str] = ..., steps: _Optional[int] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., commit: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class RolloutResponse(_message.Message):
    __slots__ = ("y", "position", "tokens")
    Y_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    position: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("model", "version", "sequence_id", "sequence_key")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sequence_id: int
    sequence_key: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sequence_id: _Optional[int] = ..., sequence_key: _Optional[str] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...
