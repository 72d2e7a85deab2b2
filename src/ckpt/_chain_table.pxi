# The element table (included into _executor.pxi): decoding the integer and real tables that
# ckpt.executor builds into Element rows (by column name), and checking them -- and each
# compiled schedule's rows -- against what the executor's loops and each kind's kernels need,
# once, with the GIL, so that the run loops check nothing.


cdef int _decode_table(Element *table, const int64_t[:, ::1] ints,
                       const double[:, ::1] reals) except -1:
    """Fill table[0 .. rows - 1] from the tables' columns, read by name."""
    cdef Py_ssize_t i, n = ints.shape[0]
    cdef Element *e
    col = {name: j for j, name in enumerate(ELEMENT_COLUMNS)}
    real = {name: j for j, name in enumerate(ELEMENT_REALS)}
    for i in range(n):
        e = &table[i]
        e.kind = <int>ints[i, col["kind"]]
        e.act = <int>ints[i, col["act"]]
        e.n_in = ints[i, col["n_in"]]
        e.n_out = ints[i, col["n_out"]]
        e.param = ints[i, col["param"]]
        e.body = ints[i, col["body"]]
        e.body_len = ints[i, col["body_len"]]
        e.tape = ints[i, col["tape"]]
        e.fwd_scratch = ints[i, col["forward_scratch"]]
        e.bwd_scratch = ints[i, col["backward_scratch"]]
        e.inner_width = ints[i, col["inner_width"]]
        e.stream = <uint64_t>ints[i, col["stream"]]
        e.reads_output = ints[i, col["reads_output"]] != 0
        e.needs_preact = ints[i, col["needs_preactivation"]] != 0
        e.alpha = reals[i, real["alpha"]]
        e.eps = reals[i, real["eps"]]
        e.p = reals[i, real["p"]]
        e.threshold = dropout_threshold(e.p) if 0 <= e.p < 1 else 0
    return 0


cdef int _check_table(const Element *table, Py_ssize_t n_table, Py_ssize_t n_elements,
                      const Py_ssize_t *sizes, Py_ssize_t n_params) except -1:
    """Every row against what the executor and its kind's kernels need: widths that
    connect, bodies that are ranges after their block (each row in at most one body),
    then the kind's own check."""
    cdef Py_ssize_t i, j
    cdef const Element *e
    owner = [-1] * n_table
    for i in range(n_table):
        e = &table[i]
        if not 0 <= e.kind < _n_kinds:
            raise ValueError(f"element {i}: unknown kind {e.kind}")
        if e.n_in <= 0 or e.n_out <= 0:
            raise ValueError(f"element {i}: widths must be positive, got {e.n_in} -> {e.n_out}")
        _check_blas_dim(e.n_in, f"element {i} in_features")
        _check_blas_dim(e.n_out, f"element {i} out_features")
        if i < n_elements - 1 and e.n_out != table[i + 1].n_in:
            raise ValueError(f"element {i + 1} expects {table[i + 1].n_in} input "
                             f"features, but element {i} produces {e.n_out}")
        if e.tape < 0 or e.fwd_scratch < 0 or e.bwd_scratch < 0:
            raise ValueError(f"element {i}: negative tape or scratch")
        if not _KIND_OPS[e.kind].has_body:
            if e.tape != 0:
                raise ValueError(f"element {i}: only Residual blocks have a tape")
        else:
            if e.body <= i or e.body_len < 1 or e.body + e.body_len > n_table:
                raise ValueError(f"element {i}: body {e.body}..{e.body + e.body_len - 1} is "
                                 f"not a range after it in the table of {n_table}")
            for j in range(e.body, e.body + e.body_len):
                if owner[j] >= 0:
                    raise ValueError(f"element {j} is in two bodies")
                owner[j] = i
        _KIND_OPS[e.kind].check(table, e, i, sizes, n_params)
    for i in range(n_elements):
        if owner[i] >= 0:
            raise ValueError(f"chain element {i} is also in a body")
    return 0


cdef int _check_rows(const Element *table, Py_ssize_t n_elements, const int64_t[:, ::1] rows,
                     Py_ssize_t m, Py_ssize_t arena_size) except -1:
    """Refuse any row that would index outside the elements or the arena. Offsets are in
    elements per batch row: the executor multiplies them by the batch size."""
    cdef Py_ssize_t r, op, i, out, tape, scratch, need
    cdef Py_ssize_t room = arena_size // m if m > 0 else 0   # arena size per batch row
    cdef const Element *e
    if rows.shape[1] != 6:
        raise ValueError(f"a compiled schedule has 6 columns, got {rows.shape[1]}")
    for r in range(rows.shape[0]):
        op, i, out, tape, scratch = rows[r, 0], rows[r, 1], rows[r, 2], rows[r, 4], rows[r, 5]
        if op == OP_FREE:
            if not 0 <= i <= n_elements:
                raise ValueError(f"schedule row {r}: no activation {i}")
            continue
        if op != OP_FORWARD and op != OP_BACKWARD or not 0 <= i < n_elements:
            raise ValueError(f"schedule row {r}: bad operation ({op}, {i})")
        if m == 0:
            continue        # nothing is read or written
        e = &table[i]
        if tape >= 0 and (e.tape == 0 or tape > room - e.tape):
            raise ValueError(f"schedule row {r}: tape offset {tape} is outside the arena "
                             f"of {room} values per row")
        if op == OP_FORWARD:
            if out < 0 and i != n_elements - 1:
                raise ValueError(f"schedule row {r}: only the last element writes the output")
            if out >= 0 and out > room - e.n_out:
                raise ValueError(f"schedule row {r}: offset {out} overruns the arena of "
                                 f"{room} values per row")
            need = e.fwd_scratch
        else:
            need = e.bwd_scratch + (e.tape if tape < 0 else 0)
        if need and (scratch < 0 or scratch > room - need):
            raise ValueError(f"schedule row {r}: scratch at {scratch} does not fit "
                             f"{need} values per row in the arena of {room}")
    return 0
