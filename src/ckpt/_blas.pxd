# Declarations of the prefixed CBLAS symbols of the scipy-openblas32 wheel (its own cblas.h).
# blasint is a 32-bit int in this build: callers must check every dimension against INT_MAX.

cdef extern from "cblas.h" nogil:
    ctypedef int blasint

    cdef enum CBLAS_ORDER:
        CblasRowMajor
        CblasColMajor

    cdef enum CBLAS_TRANSPOSE:
        CblasNoTrans
        CblasTrans

    void scipy_cblas_sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE transa, CBLAS_TRANSPOSE transb,
                           blasint m, blasint n, blasint k, float alpha, const float *a,
                           blasint lda, const float *b, blasint ldb, float beta, float *c,
                           blasint ldc)
    void scipy_cblas_dgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE transa, CBLAS_TRANSPOSE transb,
                           blasint m, blasint n, blasint k, double alpha, const double *a,
                           blasint lda, const double *b, blasint ldb, double beta, double *c,
                           blasint ldc)

    void scipy_openblas_set_num_threads(int num_threads)
    int scipy_openblas_get_num_threads()
    char *scipy_openblas_get_config()
