/* A stand-in for a kernel-bypass library (libonload, libvma, libexasock_preload): preloaded with
 * LD_PRELOAD it wraps the socket calls a bypass stack takes over and counts them, then calls the
 * real libc function. Built by tests/integration/test_transport.py at test time:
 *
 *   gcc -shared -fPIC -O2 -Wall -o libfakebypass.so interposer.c -ldl
 *   gcc -shared -fPIC -O2 -Wall -DAS_ONLOAD -o libonload.so interposer.c -ldl
 *
 * The second build also exports onload_is_present() and onload_fd_stat(), so the gateway's
 * production detection path (the presence symbol, per-socket acceleration) runs against it;
 * onload_fd_stat() says "not accelerated" when FAKE_ONLOAD_NOT_ACCELERATED is set.
 * At exit the counters go to "$FAKE_BYPASS_REPORT.<pid>" as one line of name=count pairs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

enum { C_SOCKET, C_ACCEPT, C_ACCEPT4, C_SEND, C_SENDTO, C_SENDMSG, C_WRITE, C_WRITEV, C_EPOLL_CTL, C_N };
static const char *const names[C_N] = {"socket", "accept", "accept4", "send", "sendto",
                                       "sendmsg", "write", "writev", "epoll_ctl"};
static atomic_long counts[C_N];

int fake_bypass_present(void) { return 1; }
long fake_bypass_count(int i) { return (i >= 0 && i < C_N) ? atomic_load(&counts[i]) : -1; }

static int is_socket(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
}

#ifdef AS_ONLOAD
/* Onload's extension API, src/include/onload/extensions.h */
struct onload_stat {
    int32_t stack_id;
    char *stack_name;
    int32_t endpoint_id;
    int32_t endpoint_state;
};
int onload_is_present(void) { return 1; }
int onload_fd_stat(int fd, struct onload_stat *stat) {
    /* FAKE_ONLOAD_NOT_ACCELERATED: like a socket bound to an address Onload does not serve */
    if (!is_socket(fd) || getenv("FAKE_ONLOAD_NOT_ACCELERATED")) return 0;
    stat->stack_id = 0;
    stat->stack_name = strdup("fake");
    stat->endpoint_id = fd;
    stat->endpoint_state = 0;
    return 1;
}
#endif

#define REAL(ret, name, args)                                          \
    static ret(*real_##name) args;                                     \
    if (!real_##name) real_##name = (ret(*) args)dlsym(RTLD_NEXT, #name)

int socket(int domain, int type, int protocol) {
    REAL(int, socket, (int, int, int));
    atomic_fetch_add(&counts[C_SOCKET], 1);
    return real_socket(domain, type, protocol);
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    REAL(int, accept, (int, struct sockaddr *, socklen_t *));
    atomic_fetch_add(&counts[C_ACCEPT], 1);
    return real_accept(fd, addr, len);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    REAL(int, accept4, (int, struct sockaddr *, socklen_t *, int));
    atomic_fetch_add(&counts[C_ACCEPT4], 1);
    return real_accept4(fd, addr, len, flags);
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    REAL(ssize_t, send, (int, const void *, size_t, int));
    atomic_fetch_add(&counts[C_SEND], 1);
    return real_send(fd, buf, len, flags);
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *to,
               socklen_t tolen) {
    REAL(ssize_t, sendto, (int, const void *, size_t, int, const struct sockaddr *, socklen_t));
    atomic_fetch_add(&counts[C_SENDTO], 1);
    return real_sendto(fd, buf, len, flags, to, tolen);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    REAL(ssize_t, sendmsg, (int, const struct msghdr *, int));
    atomic_fetch_add(&counts[C_SENDMSG], 1);
    return real_sendmsg(fd, msg, flags);
}

ssize_t write(int fd, const void *buf, size_t len) {
    REAL(ssize_t, write, (int, const void *, size_t));
    if (is_socket(fd)) atomic_fetch_add(&counts[C_WRITE], 1);
    return real_write(fd, buf, len);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(ssize_t, writev, (int, const struct iovec *, int));
    if (is_socket(fd)) atomic_fetch_add(&counts[C_WRITEV], 1);
    return real_writev(fd, iov, iovcnt);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event) {
    REAL(int, epoll_ctl, (int, int, int, struct epoll_event *));
    atomic_fetch_add(&counts[C_EPOLL_CTL], 1);
    return real_epoll_ctl(epfd, op, fd, event);
}

__attribute__((destructor)) static void dump(void) {
    const char *base = getenv("FAKE_BYPASS_REPORT");
    if (!base) return;
    char path[4096];
    snprintf(path, sizeof path, "%s.%d", base, (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f) return;
    for (int i = 0; i < C_N; i++) fprintf(f, "%s%s=%ld", i ? " " : "", names[i], atomic_load(&counts[i]));
    fputc('\n', f);
    fclose(f);
}
