"""16-byte loads and stores and fp16 packing as numba-cuda intrinsics (GPU target only).

numba has no 128-bit element type, and NVVM cannot merge four 32-bit accesses into one vector access
because it cannot prove their alignment. These intrinsics load / store a ``<4 x i32>`` declared
16-byte aligned, which NVPTX emits as ``ld.global.v4.b32`` / ``st.global.v4.b32``. The caller
guarantees the alignment (a row start aligned to 16 bytes and a column that is a multiple of 4).
Imported by :mod:`.cuda_adapter` only when the simulator is off; it has Python twins there.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.cuda import cgutils
from numba.cuda.extending import intrinsic

_I32 = ir.IntType(32)
_VEC4 = ir.VectorType(_I32, 4)
_WORDS4 = types.UniTuple(types.int32, 4)


def _is_int32_matrix(array) -> bool:
    return isinstance(array, types.Array) and array.dtype == types.int32 and array.ndim == 2


def _word_pointer(context, builder, array_type, array, row, col, index_types):
    """Address of ``array[row, col]`` as a ``<4 x i32>*``."""
    ary = context.make_array(array_type)(context, builder, value=array)
    indices = [context.cast(builder, v, t, types.intp) for v, t in zip((row, col), index_types)]
    ptr = cgutils.get_item_pointer(context, builder, array_type, ary, indices, wraparound=False)
    return builder.bitcast(ptr, _VEC4.as_pointer())


@intrinsic
def load_words4(typingctx, array, row, col):
    """``array[row, col:col + 4]`` of a 2-D int32 array as a 4-tuple, in one 16-byte load."""
    if not _is_int32_matrix(array):
        return None

    def codegen(context, builder, sig, args):
        ptr = _word_pointer(context, builder, sig.args[0], args[0], args[1], args[2], sig.args[1:])
        vec = builder.load(ptr, align=16)
        words = [builder.extract_element(vec, ir.Constant(_I32, i)) for i in range(4)]
        return context.make_tuple(builder, sig.return_type, words)

    return _WORDS4(array, row, col), codegen


@intrinsic
def store_words4(typingctx, array, row, col, w0, w1, w2, w3):
    """``array[row, col:col + 4] = (w0, w1, w2, w3)`` for a 2-D int32 array, in one 16-byte store."""
    if not _is_int32_matrix(array):
        return None

    def codegen(context, builder, sig, args):
        ptr = _word_pointer(context, builder, sig.args[0], args[0], args[1], args[2], sig.args[1:3])
        vec = ir.Constant(_VEC4, ir.Undefined)
        for i, (value, value_type) in enumerate(zip(args[3:], sig.args[3:])):
            word = context.cast(builder, value, value_type, types.int32)
            vec = builder.insert_element(vec, word, ir.Constant(_I32, i))
        builder.store(vec, ptr, align=16)
        return context.get_dummy_value()

    return types.void(array, row, col, w0, w1, w2, w3), codegen


@intrinsic
def pack_f16x2(typingctx, lo, hi):
    """Two float32 rounded to fp16 (``cvt.rn``), ``lo`` in the low 16 bits of the int32."""

    def codegen(context, builder, sig, args):
        halves = []
        for value, value_type in zip(args, sig.args):
            f32 = context.cast(builder, value, value_type, types.float32)
            bits = builder.bitcast(builder.fptrunc(f32, ir.HalfType()), ir.IntType(16))
            halves.append(builder.zext(bits, _I32))
        return builder.or_(halves[0], builder.shl(halves[1], ir.Constant(_I32, 16)))

    return types.int32(lo, hi), codegen
