# The elementwise kernels behind runtime CPU dispatch (see _simd.h): activation codes, the
# table of kernels of the active variant, and the functions that choose the variant.

from libc.stdint cimport int64_t, uint64_t

cdef extern from "_simd.h" nogil:
    cdef enum:
        ACT_IDENTITY "CKPT_ACT_IDENTITY"
        ACT_COUNT "CKPT_ACT_COUNT"
        SIMD_COUNT "CKPT_SIMD_COUNT"

    const char *ckpt_act_name(int act)

    ctypedef struct ckpt_simd_table:
        void (*bias_activate_f)(float *y, const float *b, Py_ssize_t m, Py_ssize_t n, int act,
                                float alpha) noexcept nogil
        void (*bias_activate_d)(double *y, const double *b, Py_ssize_t m, Py_ssize_t n, int act,
                                double alpha) noexcept nogil
        void (*delta_f)(const float *g, const float *v, float *d, Py_ssize_t size, int act,
                        float alpha) noexcept nogil
        void (*delta_d)(const double *g, const double *v, double *d, Py_ssize_t size, int act,
                        double alpha) noexcept nogil
        void (*column_sums_f)(const float *d, float *gb, Py_ssize_t m,
                              Py_ssize_t n) noexcept nogil
        void (*column_sums_d)(const double *d, double *gb, Py_ssize_t m,
                              Py_ssize_t n) noexcept nogil
        void (*sgd_step_f)(float *p, const float *g, Py_ssize_t n, float lr) noexcept nogil
        void (*sgd_step_d)(double *p, const double *g, Py_ssize_t n, double lr) noexcept nogil
        void (*sgd_momentum_step_f)(float *p, const float *g, float *buf, Py_ssize_t n, float lr,
                                    float momentum, float weight_decay,
                                    int nesterov) noexcept nogil
        void (*sgd_momentum_step_d)(double *p, const double *g, double *buf, Py_ssize_t n,
                                    double lr, double momentum, double weight_decay,
                                    int nesterov) noexcept nogil
        void (*adam_step_f)(float *p, const float *g, float *m, float *v, Py_ssize_t n,
                            float step_size, float beta1, float beta2, float eps,
                            float inv_sqrt_bc2, float weight_decay,
                            float decay_factor) noexcept nogil
        void (*adam_step_d)(double *p, const double *g, double *m, double *v, Py_ssize_t n,
                            double step_size, double beta1, double beta2, double eps,
                            double inv_sqrt_bc2, double weight_decay,
                            double decay_factor) noexcept nogil
        void (*layernorm_forward_f)(const float *x, const float *gamma, const float *beta,
                                    float *y, Py_ssize_t m, Py_ssize_t n,
                                    double eps) noexcept nogil
        void (*layernorm_forward_d)(const double *x, const double *gamma, const double *beta,
                                    double *y, Py_ssize_t m, Py_ssize_t n,
                                    double eps) noexcept nogil
        void (*layernorm_backward_f)(const float *x, const float *gamma, const float *g,
                                     float *gx, float *ggamma, float *gbeta, Py_ssize_t m,
                                     Py_ssize_t n, double eps) noexcept nogil
        void (*layernorm_backward_d)(const double *x, const double *gamma, const double *g,
                                     double *gx, double *ggamma, double *gbeta, Py_ssize_t m,
                                     Py_ssize_t n, double eps) noexcept nogil
        void (*dropout_f)(const float *src, float *dst, Py_ssize_t m, Py_ssize_t n,
                          uint64_t key, int64_t row0, uint64_t threshold,
                          float scale) noexcept nogil
        void (*dropout_d)(const double *src, double *dst, Py_ssize_t m, Py_ssize_t n,
                          uint64_t key, int64_t row0, uint64_t threshold,
                          double scale) noexcept nogil

    const ckpt_simd_table *ckpt_simd_kernels()
    bint ckpt_simd_supported(int variant)
    int ckpt_simd_best()
    int ckpt_simd_select(int variant)
    int ckpt_simd_active()
    const char *ckpt_simd_name(int variant)
