/* Bind the three glibc symbols whose default versions are newer than glibc 2.17 to their
 * original versions, so that the wheel's floor is manylinux2014 (glibc 2.17), not the build
 * machine's glibc.
 *
 * glibc 2.34 moved libpthread into libc and gave pthread_create and pthread_mutex_trylock new
 * default versions there (GLIBC_2.34); 2.32 did the same for pthread_sigmask (GLIBC_2.32).
 * Linking against a newer glibc binds to those, and auditwheel then grants manylinux_2_34 only.
 * The GLIBC_2.2.5 versions are the same functions, still exported by every later glibc (as
 * compatibility symbols of libc.so.6), and by libpthread.so.0 before 2.34, which setup.py links
 * for that reason. `auditwheel show` on the repaired wheel lists what sets the floor.
 *
 * setup.py force-includes this file (-include) in every extension, on x86_64 glibc only. */
#ifndef CKPT_GLIBC_COMPAT_H
#define CKPT_GLIBC_COMPAT_H
#if defined(__x86_64__) && defined(__linux__)
__asm__(".symver pthread_create,pthread_create@GLIBC_2.2.5");
__asm__(".symver pthread_mutex_trylock,pthread_mutex_trylock@GLIBC_2.2.5");
__asm__(".symver pthread_sigmask,pthread_sigmask@GLIBC_2.2.5");
#endif
#endif
