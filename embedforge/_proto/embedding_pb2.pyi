from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT32: _ClassVar[OutputType]
    INT8: _ClassVar[OutputType]
    UINT8: _ClassVar[OutputType]
    BINARY: _ClassVar[OutputType]
    UBINARY: _ClassVar[OutputType]

class Overflow(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OVERFLOW_UNSPECIFIED: _ClassVar[Overflow]
    TRUNCATE: _ClassVar[Overflow]
    ERROR: _ClassVar[Overflow]
    CHUNK: _ClassVar[Overflow]

class TruncationDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RIGHT: _ClassVar[TruncationDirection]
    LEFT: _ClassVar[TruncationDirection]

class InputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_TYPE_UNSPECIFIED: _ClassVar[InputType]
    QUERY: _ClassVar[InputType]
    DOCUMENT: _ClassVar[InputType]
FLOAT32: OutputType
INT8: OutputType
UINT8: OutputType
BINARY: OutputType
UBINARY: OutputType
OVERFLOW_UNSPECIFIED: Overflow
TRUNCATE: Overflow
ERROR: Overflow
CHUNK: Overflow
RIGHT: TruncationDirection
LEFT: TruncationDirection
INPUT_TYPE_UNSPECIFIED: InputType
QUERY: InputType
DOCUMENT: InputType

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "truncate", "normalize", "dimensions", "input_type", "truncation_direction", "overflow", "chunk_overlap", "output_type")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    truncate: bool
    normalize: bool
    dimensions: int
    input_type: InputType
    truncation_direction: TruncationDirection
    overflow: Overflow
    chunk_overlap: int
    output_type: OutputType
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., truncate: _Optional[bool] = ..., normalize: _Optional[bool] = ..., dimensions: _Optional[int] = ..., input_type: _Optional[_Union[InputType, str]] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., overflow: _Optional[_Union[Overflow, str]] = ..., chunk_overlap: _Optional[int] = ..., output_type: _Optional[_Union[OutputType, str]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("vectors", "dim", "count", "usage", "timing", "embedding_space", "text_tokens", "truncated", "output_type", "row_bytes")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SPACE_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_BYTES_FIELD_NUMBER: _ClassVar[int]
    vectors: bytes
    dim: int
    count: int
    usage: Usage
    timing: Timing
    embedding_space: str
    text_tokens: _containers.RepeatedScalarFieldContainer[int]
    truncated: _containers.RepeatedScalarFieldContainer[int]
    output_type: OutputType
    row_bytes: int
    def __init__(self, vectors: _Optional[bytes] = ..., dim: _Optional[int] = ..., count: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., embedding_space: _Optional[str] = ..., text_tokens: _Optional[_Iterable[int]] = ..., truncated: _Optional[_Iterable[int]] = ..., output_type: _Optional[_Union[OutputType, str]] = ..., row_bytes: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("query", "documents", "top_k", "truncate", "truncation_direction")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    truncate: bool
    truncation_direction: TruncationDirection
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "top_indices", "usage", "timing", "embedding_space", "query_tokens", "document_tokens", "query_truncated", "truncated_documents")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOP_INDICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SPACE_FIELD_NUMBER: _ClassVar[int]
    QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    top_indices: _containers.RepeatedScalarFieldContainer[int]
    usage: Usage
    timing: Timing
    embedding_space: str
    query_tokens: int
    document_tokens: _containers.RepeatedScalarFieldContainer[int]
    query_truncated: bool
    truncated_documents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., top_indices: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., embedding_space: _Optional[str] = ..., query_tokens: _Optional[int] = ..., document_tokens: _Optional[_Iterable[int]] = ..., query_truncated: _Optional[bool] = ..., truncated_documents: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "dim", "max_length", "precision", "provider", "pooling", "limits", "server_version", "matryoshka_dims", "any_dimensions", "embedding_space", "prompts")
    class PromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MATRYOSHKA_DIMS_FIELD_NUMBER: _ClassVar[int]
    ANY_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SPACE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    dim: int
    max_length: int
    precision: str
    provider: str
    pooling: str
    limits: Limits
    server_version: str
    matryoshka_dims: _containers.RepeatedScalarFieldContainer[int]
    any_dimensions: bool
    embedding_space: str
    prompts: _containers.ScalarMap[str, str]
    def __init__(self, model_name: _Optional[str] = ..., dim: _Optional[int] = ..., max_length: _Optional[int] = ..., precision: _Optional[str] = ..., provider: _Optional[str] = ..., pooling: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., matryoshka_dims: _Optional[_Iterable[int]] = ..., any_dimensions: _Optional[bool] = ..., embedding_space: _Optional[str] = ..., prompts: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_texts_per_request", "max_chars_per_text", "max_batch_tokens", "max_queue_tokens", "max_wait_ms", "min_batch_tokens")
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_PER_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_texts_per_request: int
    max_chars_per_text: int
    max_batch_tokens: int
    max_queue_tokens: int
    max_wait_ms: float
    min_batch_tokens: int
    def __init__(self, max_texts_per_request: _Optional[int] = ..., max_chars_per_text: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_queue_tokens: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., min_batch_tokens: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    def __init__(self, tokens: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "tokenize_ms", "inference_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., tokenize_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...
