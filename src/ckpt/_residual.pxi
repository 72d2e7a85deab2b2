# The Residual kind (included into _core.pyx after the executor): y = x + f(x), f being its
# body, a range of later rows of the element table. With a tape its internals (each body output
# and the body's own tapes) are kept for its backward; without, its backward rebuilds them in
# scratch. Registered in the executor's kind table. The NumPy twin is ckpt.elements.residual.


cdef inline Py_ssize_t _pingpong(const Element *e) noexcept nogil:
    """Ping-pong buffers a Residual body of k elements needs: min(k - 1, 2)."""
    return e.body_len - 1 if e.body_len < 3 else 2


cdef inline bint _tapes_last(const Element *table, const Element *e) noexcept nogil:
    """Whether a Residual keeps (and rebuilds) its last body element's output: only when that
    element's backward reads it or it has internals of its own. Otherwise it goes straight into
    y. (ckpt.costs.residual_tapes_last)"""
    cdef const Element *last = table + e.body + e.body_len - 1
    return last.reads_output or last.tape > 0


cdef void _residual_forward(const Element *table, const Element *e, Step *s,
                            const floating *x, floating *y, floating *scratch,
                            floating *tape) noexcept nogil:
    """y = x + f(x). With a tape, each body output t_j and its own tape are laid out in order
    (y may then be NULL: only the internals are wanted); without, the body ping-pongs between
    two buffers and its last output goes straight to y."""
    cdef Py_ssize_t m = s.m, j, k = e.body_len, i, size = m * e.n_out
    cdef const Element *b
    cdef const floating *src = x
    cdef floating *dst
    cdef floating *nested = scratch + m * e.inner_width * _pingpong(e)
    cdef floating *place = tape
    cdef bint last_taped = _tapes_last(table, e)
    for j in range(k):
        b = table + e.body + j
        if tape != NULL and (j < k - 1 or last_taped):
            dst = place
            _forward(table, b, s, src, dst, scratch, place + m * b.n_out if b.tape else NULL)
            place += m * (b.n_out + b.tape)
        elif tape != NULL and y == NULL:
            return      # rebuilding the internals: the last output is not one of them
        else:
            dst = y if j == k - 1 else scratch + m * e.inner_width * (j % 2)
            _forward(table, b, s, src, dst, scratch if tape != NULL else nested, NULL)
        src = dst
    if tape == NULL or not last_taped:
        for i in range(size):
            y[i] += x[i]
    elif y != NULL:     # NULL when a backward only rebuilds the internals
        for i in range(size):
            y[i] = x[i] + src[i]


cdef void _residual_backward(const Element *table, const Element *e, Step *s,
                             const floating *x, const floating *g, floating *gx,
                             floating *scratch, floating *tape) noexcept nogil:
    """Back-propagate y = x + f(x): rebuild f's internals (unless taped), run f's backward
    through ping-pong gradient buffers, then add the skip path's gradient g."""
    cdef Py_ssize_t m = s.m, j, k = e.body_len, i, size = m * e.n_in
    cdef const Element *b
    cdef floating *rest = scratch
    cdef floating *place
    cdef floating *dst
    cdef const floating *src
    cdef const floating *grad = g
    cdef floating *buffers
    cdef floating *nested
    cdef floating *out
    cdef bint last_taped
    if tape == NULL and e.tape:     # recompute the internals into the front of the scratch
        tape = scratch
        rest = scratch + m * e.tape
        _residual_forward(table, e, s, x, NULL, rest, tape)
    buffers = rest
    nested = rest + m * e.inner_width * _pingpong(e)
    place = tape + m * e.tape   # body j's output and tape sit just below body j + 1's
    last_taped = _tapes_last(table, e)
    for j in range(k - 1, -1, -1):
        b = table + e.body + j
        if j < k - 1 or last_taped:
            place -= m * (b.n_out + b.tape)
            out = place
        else:
            out = NULL      # its backward reads neither its output nor a buffer of its size
        src = x if j == 0 else place - m * (table[e.body + j - 1].n_out
                                            + table[e.body + j - 1].tape)
        dst = gx if j == 0 else buffers + m * e.inner_width * ((k - 1 - j) % 2)
        _backward(table, b, s, src, out, out, grad, dst, nested,
                  place + m * b.n_out if out != NULL and b.tape else NULL)
        grad = dst
    if gx != NULL:
        for i in range(size):
            gx[i] += g[i]


cdef void _residual_element_backward(const Element *table, const Element *e, Step *s,
                                     const floating *x, const floating *y, floating *d,
                                     const floating *g, floating *gx, floating *scratch,
                                     floating *tape) noexcept nogil:
    _residual_backward(table, e, s, x, g, gx, scratch, tape)


cdef int _residual_check(const Element *table, const Element *e, Py_ssize_t index,
                         const Py_ssize_t *sizes, Py_ssize_t n_params) except -1:
    """The body connects from the block's input back to its width, and the declared inner
    width, tape and scratch are what the loops above lay out."""
    cdef Py_ssize_t j, fwd = 0, bwd = 0, tape = 0, width = 0
    cdef const Element *b
    if e.n_in != e.n_out:
        raise ValueError(f"element {index}: a width-preserving element maps {e.n_in} to "
                         f"{e.n_out} features")
    for j in range(e.body_len):
        b = table + e.body + j
        if b.n_in != (e.n_in if j == 0 else table[e.body + j - 1].n_out):
            raise ValueError(f"element {index}: body element {j} expects {b.n_in} input "
                             f"features, which its input does not have")
        width = max(width, b.n_out)
        if j < e.body_len - 1 or _tapes_last(table, e):
            tape += b.n_out + b.tape
        fwd = max(fwd, b.fwd_scratch)
        bwd = max(bwd, b.bwd_scratch)
    if table[e.body + e.body_len - 1].n_out != e.n_out:
        raise ValueError(f"element {index}: the body ends with "
                         f"{table[e.body + e.body_len - 1].n_out} features, the "
                         f"block's output has {e.n_out}")
    if e.inner_width < width or e.tape != tape:
        raise ValueError(f"element {index}: inner width {e.inner_width} / tape {e.tape} "
                         f"do not fit the body (needs >= {width} / == {tape})")
    if (e.fwd_scratch < _pingpong(e) * e.inner_width + fwd
            or e.bwd_scratch < max(fwd, _pingpong(e) * e.inner_width + bwd)):
        raise ValueError(f"element {index}: declared scratch {e.fwd_scratch} / "
                         f"{e.bwd_scratch} is less than the body needs")
    return 0


cdef KindOps _residual_ops
_residual_ops.forward_f = _residual_forward[float]
_residual_ops.forward_d = _residual_forward[double]
_residual_ops.backward_f = _residual_element_backward[float]
_residual_ops.backward_d = _residual_element_backward[double]
_residual_ops.check = _residual_check
_residual_ops.has_body = True
_residual_ops.is_gemm = False
_register_kind("residual", _residual_ops)
