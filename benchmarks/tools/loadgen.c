/*
 * loadgen.c - USB/IP load generator (client side).
 *
 * Usage:
 *   loadgen --host H --port P --busid B
 *           --mode bulk-in|bulk-out|control|iso-in [--ep N]
 *           [--size BYTES] --inflight K --seconds T
 *           [--iso-packets N] [--warmup S] [--set-alt IFACE:ALT]
 *           [--set-config N] [--out-byte B]
 *
 * --set-alt sends SET_INTERFACE(IFACE, ALT) on ep0 right after the import
 * and before the run (e.g. the iso endpoints of gadget zero only exist in
 * alt setting 1); a failure (no reply within 5 s or status != 0) exits 2.
 * --set-config sends SET_CONFIGURATION(N) likewise, before --set-alt (a
 * device exported by the kernel's usbip-host is unconfigured until then).
 * --out-byte sets the byte bulk-out payloads are filled with (default
 * 0xa5; a SourceSink gadget with pattern 0 wants 0).
 *
 * Imports busid B over USB/IP (protocol 0x0111) and keeps K URBs in flight
 * on one endpoint for T seconds (after S seconds of warm-up, default 0.5).
 * Replies are read with large reads; every complete reply of a read is
 * processed and all refills of that read leave in one writev().  Latency
 * (submit -> completion, CLOCK_MONOTONIC, taken once per batch) goes into
 * a log-linear histogram (relative resolution 1/1024).
 *
 * Prints one JSON line:
 *   {"mode":..,"size":..,"inflight":..,"seconds":..,"urbs":..,
 *    "urbs_per_s":..,"mb_per_s":..,"p50_us":..,"p99_us":..,"errors":..}
 * Exit status: 0 ok, 1 errors during the run (or no URB completed inside
 * the measured window), 2 usage/connect/import failure.
 *
 * "seconds" is the measured window (after warm-up); only URBs completing
 * inside it count towards urbs/urbs_per_s/mb_per_s (payload bytes =
 * actual_length of the replies) and the latency percentiles.  Errors count
 * replies with status != 0, unknown seqnums and URBs still outstanding
 * after the ~5 s drain.  Set LOADGEN_STATS=1 to get read/submit counts on
 * stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#define USBIP_VERSION 0x0111
#define OP_REQ_IMPORT 0x8003
#define OP_REP_IMPORT 0x0003

#define CMD_SUBMIT 1
#define CMD_UNLINK 2
#define RET_SUBMIT 3
#define RET_UNLINK 4

#define HDR_LEN 48
#define ISO_DESC_LEN 16
#define DEV_REC_LEN 312

#define MAX_XFER (16u * 1024u * 1024u)
#define MAX_PACKETS 1024u
#define MAX_INFLIGHT 65536

#ifndef RBUF_SIZE
#define RBUF_SIZE (4u << 20)
#endif
#define WBUF_MAX (8u << 20)
#define IOV_CAP 2048

#define URB_ISO_ASAP 0x0002

#define DRAIN_NS 5000000000LL       /* bounded wait for outstanding replies */
#define RCV_TIMEOUT_US 100000       /* read timeout so the clock is checked */

enum mode { M_BULK_IN, M_BULK_OUT, M_CONTROL, M_ISO_IN };
static const char *mode_names[] = {"bulk-in", "bulk-out", "control",
                                   "iso-in"};

/* ------------------------------------------------------------------ */

static inline uint32_t get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void put_be16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* latency histogram: log-linear, 1024 sub-buckets per power of two   */

#define H_SUB_BITS 10
#define H_SUB (1u << H_SUB_BITS)
#define H_MAX_SHIFT 40
#define H_BUCKETS ((H_MAX_SHIFT + 2) * H_SUB)

static uint64_t hist[H_BUCKETS];
static uint64_t hist_n;

static inline void hist_add(int64_t v)
{
    if (v < 0)
        v = 0;
    uint64_t u = (uint64_t)v;
    size_t idx;
    if (u < 2 * H_SUB) {
        idx = (size_t)u;
    } else {
        int msb = 63 - __builtin_clzll(u);
        int shift = msb - H_SUB_BITS;
        if (shift > H_MAX_SHIFT) {
            shift = H_MAX_SHIFT;
            u = ((uint64_t)(2 * H_SUB) << shift) - 1;
        }
        idx = (size_t)(shift + 1) * H_SUB + (size_t)((u >> shift) - H_SUB);
    }
    hist[idx]++;
    hist_n++;
}

/* value (ns) at the middle of bucket idx */
static double hist_value(size_t idx)
{
    if (idx < 2 * H_SUB)
        return (double)idx;
    size_t shift = idx / H_SUB - 1;
    uint64_t base = ((uint64_t)(idx % H_SUB) + H_SUB) << shift;
    return (double)base + (double)((uint64_t)1 << shift) / 2.0 - 0.5;
}

static double hist_quantile(double q)
{
    if (hist_n == 0)
        return -1;
    uint64_t rank = (uint64_t)(q * (double)hist_n);
    if (rank >= hist_n)
        rank = hist_n - 1;
    uint64_t acc = 0;
    for (size_t i = 0; i < H_BUCKETS; i++) {
        acc += hist[i];
        if (acc > rank)
            return hist_value(i);
    }
    return hist_value(H_BUCKETS - 1);
}

/* ------------------------------------------------------------------ */
/* I/O helpers                                                         */

static int writev_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        int cnt = n > IOV_MAX ? IOV_MAX : n;
        ssize_t w = writev(fd, iov, cnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        size_t left = (size_t)w;
        while (left > 0 && n > 0) {
            if (left >= iov->iov_len) {
                left -= iov->iov_len;
                iov++;
                n--;
            } else {
                iov->iov_base = (uint8_t *)iov->iov_base + left;
                iov->iov_len -= left;
                left = 0;
            }
        }
    }
    return 0;
}

static int read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = ECONNRESET;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* in-flight table: indexed by seqnum & mask, seqnums that would       */
/* collide with a still-outstanding URB are skipped                    */

struct slot {
    uint32_t seq;  /* 0 = free */
    int64_t t_sub;
};

static struct slot *tbl;
static uint32_t tbl_mask;
static uint32_t next_seq;
static long outstanding;

/* ------------------------------------------------------------------ */
/* submit batching                                                     */

struct wctx {
    int fd;
    uint8_t *buf;
    size_t cap, used;
    struct iovec iov[IOV_CAP];
    int niov;
    const uint8_t *tmpl;     /* submit header (+ iso descriptors) */
    size_t tmpl_len;
    const uint8_t *payload;  /* OUT payload or NULL */
    size_t payload_len;
    int64_t batch_t;         /* submit time for the current batch */
};

static void w_iov(struct wctx *w, const void *p, size_t len)
{
    if (len == 0)
        return;
    if (w->niov > 0) {
        struct iovec *last = &w->iov[w->niov - 1];
        if ((const uint8_t *)last->iov_base + last->iov_len ==
            (const uint8_t *)p) {
            last->iov_len += len;
            return;
        }
    }
    w->iov[w->niov].iov_base = (void *)p;
    w->iov[w->niov].iov_len = len;
    w->niov++;
}

static int w_flush(struct wctx *w)
{
    int rc = 0;
    if (w->niov > 0)
        rc = writev_all(w->fd, w->iov, w->niov);
    w->niov = 0;
    w->used = 0;
    return rc;
}

/* Queue n submits.  Timestamp is taken once, before the write. */
static int submit_n(struct wctx *w, long n)
{
    w->batch_t = now_ns();
    for (long i = 0; i < n; i++) {
        if (w->used + w->tmpl_len > w->cap || w->niov + 2 > IOV_CAP) {
            if (w_flush(w) < 0)
                return -1;
        }
        uint32_t seq;
        do {
            seq = ++next_seq;
        } while (seq == 0 || tbl[seq & tbl_mask].seq != 0);
        struct slot *s = &tbl[seq & tbl_mask];
        s->seq = seq;
        s->t_sub = w->batch_t;
        outstanding++;

        uint8_t *h = w->buf + w->used;
        memcpy(h, w->tmpl, w->tmpl_len);
        put_be32(h + 4, seq);
        w->used += w->tmpl_len;
        w_iov(w, h, w->tmpl_len);
        if (w->payload != NULL)
            w_iov(w, w->payload, w->payload_len);
    }
    return w_flush(w);
}

/* ------------------------------------------------------------------ */
/* a standard control request without data stage, before the run      */

static int control_nodata(int fd, uint32_t devid, uint8_t req_type,
                          uint8_t request, uint16_t value, uint16_t index,
                          const char *what)
{
    uint8_t c[HDR_LEN];
    memset(c, 0, sizeof c);
    put_be32(c, CMD_SUBMIT);
    put_be32(c + 4, 0x7fffffffu); /* outside the run's seqnum range */
    put_be32(c + 8, devid);
    put_be32(c + 12, 0);          /* direction OUT, no data stage */
    put_be32(c + 16, 0);          /* ep0 */
    c[40] = req_type;
    c[41] = request;
    c[42] = (uint8_t)value;
    c[43] = (uint8_t)(value >> 8);
    c[44] = (uint8_t)index;
    c[45] = (uint8_t)(index >> 8);
    struct iovec cv = {c, sizeof c};
    uint8_t r[HDR_LEN];
    if (writev_all(fd, &cv, 1) < 0 || read_full(fd, r, HDR_LEN) < 0) {
        fprintf(stderr, "loadgen: %s failed: %s\n", what, strerror(errno));
        return -1;
    }
    int32_t st = (int32_t)get_be32(r + 20);
    /* an OUT reply carries no data stage: nothing more to read */
    if (get_be32(r) != RET_SUBMIT || get_be32(r + 4) != 0x7fffffffu ||
        st != 0) {
        fprintf(stderr, "loadgen: %s refused (command %u, status %d)\n", what,
                get_be32(r), st);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */

static void usage(const char *msg)
{
    if (msg != NULL)
        fprintf(stderr, "loadgen: %s\n", msg);
    fprintf(stderr,
            "usage: loadgen --host H --port P --busid B\n"
            "               --mode bulk-in|bulk-out|control|iso-in [--ep N]\n"
            "               [--size BYTES] --inflight K --seconds T\n"
            "               [--iso-packets N] [--warmup S] [--set-alt IFACE:ALT]\n"
            "               [--set-config N] [--out-byte B]\n");
    exit(2);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno != 0 || end == s || *end != 0 || v < lo || v > hi) {
        fprintf(stderr, "loadgen: invalid %s '%s' (allowed %ld..%ld)\n", what,
                s, lo, hi);
        exit(2);
    }
    return v;
}

static double parse_double(const char *s, const char *what, double lo,
                           double hi)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno != 0 || end == s || *end != 0 || !(v >= lo && v <= hi)) {
        fprintf(stderr, "loadgen: invalid %s '%s'\n", what, s);
        exit(2);
    }
    return v;
}

static void print_num(const char *key, double v, int comma)
{
    if (v < 0)
        printf("\"%s\":null", key);
    else
        printf("\"%s\":%.3f", key, v);
    if (comma)
        putchar(',');
}

int main(int argc, char **argv)
{
    const char *host = NULL, *port = NULL, *busid = NULL;
    int mode = -1;
    long ep = -1, size = -1, inflight = -1, iso_packets = 8;
    double seconds = -1, warmup = 0.5;
    long alt_iface = -1, alt_value = -1;
    long set_config = -1, out_byte = 0xa5;

    static const struct option opts[] = {
        {"host", required_argument, NULL, 'H'},
        {"port", required_argument, NULL, 'P'},
        {"busid", required_argument, NULL, 'b'},
        {"mode", required_argument, NULL, 'm'},
        {"ep", required_argument, NULL, 'e'},
        {"size", required_argument, NULL, 's'},
        {"inflight", required_argument, NULL, 'k'},
        {"seconds", required_argument, NULL, 't'},
        {"iso-packets", required_argument, NULL, 'n'},
        {"warmup", required_argument, NULL, 'w'},
        {"set-alt", required_argument, NULL, 'a'},
        {"set-config", required_argument, NULL, 'c'},
        {"out-byte", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'H':
            host = optarg;
            break;
        case 'P':
            port = optarg;
            break;
        case 'b':
            busid = optarg;
            break;
        case 'm':
            for (int i = 0; i < 4; i++)
                if (strcmp(optarg, mode_names[i]) == 0)
                    mode = i;
            if (mode < 0)
                usage("unknown --mode");
            break;
        case 'e':
            ep = parse_long(optarg, "--ep", 0, 15);
            break;
        case 's':
            size = parse_long(optarg, "--size", 0, MAX_XFER);
            break;
        case 'k':
            inflight = parse_long(optarg, "--inflight", 1, MAX_INFLIGHT);
            break;
        case 't':
            seconds = parse_double(optarg, "--seconds", 0.001, 1e6);
            break;
        case 'n':
            iso_packets = parse_long(optarg, "--iso-packets", 1, MAX_PACKETS);
            break;
        case 'w':
            warmup = parse_double(optarg, "--warmup", 0, 1e6);
            break;
        case 'a': {
            char *colon = strchr(optarg, ':');
            if (colon == NULL)
                usage("--set-alt takes IFACE:ALT");
            *colon = 0;
            alt_iface = parse_long(optarg, "--set-alt interface", 0, 255);
            alt_value = parse_long(colon + 1, "--set-alt alt setting", 0, 255);
            break;
        }
        case 'c':
            set_config = parse_long(optarg, "--set-config", 0, 255);
            break;
        case 'o':
            out_byte = parse_long(optarg, "--out-byte", 0, 255);
            break;
        default:
            usage(NULL);
        }
    }
    if (optind != argc)
        usage("unexpected positional argument");
    if (host == NULL || port == NULL || busid == NULL)
        usage("--host, --port and --busid are required");
    if (mode < 0)
        usage("--mode is required");
    if (inflight < 0)
        usage("--inflight is required");
    if (seconds < 0)
        usage("--seconds is required");
    if (strlen(busid) >= 32)
        usage("--busid too long");

    if (ep < 0)
        ep = mode == M_CONTROL ? 0 : mode == M_ISO_IN ? 2 : 1;
    if (size < 0)
        size = mode == M_CONTROL ? 18 : mode == M_ISO_IN ? 3072 : 512;
    if (mode == M_CONTROL)
        size = 18; /* GET_DESCRIPTOR(device) */
    if (mode == M_ISO_IN && size * iso_packets > (long)MAX_XFER)
        usage("--size * --iso-packets exceeds 16 MiB");
    if (mode == M_ISO_IN && size == 0)
        usage("--size must be > 0 for iso-in");

    signal(SIGPIPE, SIG_IGN);

    /* ---- connect ---- */
    struct addrinfo hints, *res = NULL, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "loadgen: cannot resolve %s:%s: %s\n", host, port,
                gai_strerror(gai));
        return 2;
    }
    int fd = -1, cerr = 0;
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            cerr = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        cerr = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        fprintf(stderr, "loadgen: cannot connect to %s:%s: %s\n", host, port,
                strerror(cerr));
        return 2;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    /* import phase: 5 s timeout on every read/write */
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    /* ---- import ---- */
    uint8_t op[8 + 32];
    memset(op, 0, sizeof op);
    put_be16(op, USBIP_VERSION);
    put_be16(op + 2, OP_REQ_IMPORT);
    memcpy(op + 8, busid, strlen(busid));
    struct iovec opv = {op, sizeof op};
    if (writev_all(fd, &opv, 1) < 0) {
        fprintf(stderr, "loadgen: sending OP_REQ_IMPORT failed: %s\n",
                strerror(errno));
        return 2;
    }
    uint8_t rep[8 + DEV_REC_LEN];
    if (read_full(fd, rep, 8) < 0) {
        fprintf(stderr, "loadgen: no OP_REP_IMPORT from %s:%s: %s\n", host,
                port, strerror(errno));
        return 2;
    }
    uint32_t rep_status = get_be32(rep + 4);
    unsigned rep_code = ((unsigned)rep[2] << 8) | rep[3];
    if (rep_code != OP_REP_IMPORT) {
        fprintf(stderr, "loadgen: unexpected reply code 0x%04x to import\n",
                rep_code);
        return 2;
    }
    if (rep_status != 0) {
        fprintf(stderr,
                "loadgen: server refused import of busid '%s' (status %u)\n",
                busid, rep_status);
        return 2;
    }
    if (read_full(fd, rep + 8, DEV_REC_LEN) < 0) {
        fprintf(stderr, "loadgen: short OP_REP_IMPORT device record: %s\n",
                strerror(errno));
        return 2;
    }
    uint32_t busnum = get_be32(rep + 8 + 288);
    uint32_t devnum = get_be32(rep + 8 + 292);
    uint32_t devid = (busnum << 16) | (devnum & 0xffff);

    /* ---- optional SET_CONFIGURATION, SET_INTERFACE (still under the 5 s
     * import timeouts) ---- */
    if (set_config >= 0) {
        char what[64];
        snprintf(what, sizeof what, "SET_CONFIGURATION(%ld)", set_config);
        /* 0x00: standard, device */
        if (control_nodata(fd, devid, 0x00, 0x09, (uint16_t)set_config, 0,
                           what) < 0)
            return 2;
    }
    if (alt_iface >= 0) {
        char what[64];
        snprintf(what, sizeof what, "SET_INTERFACE(%ld, %ld)", alt_iface,
                 alt_value);
        /* 0x01: standard, interface; wValue=alt, wIndex=iface */
        if (control_nodata(fd, devid, 0x01, 0x0b, (uint16_t)alt_value,
                           (uint16_t)alt_iface, what) < 0)
            return 2;
    }

    /* URB phase: short read timeout so the clock is checked regularly */
    tv.tv_sec = 0;
    tv.tv_usec = RCV_TIMEOUT_US;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    tv.tv_sec = 10;
    tv.tv_usec = 0;
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);

    /* ---- templates and buffers (all allocated up front) ---- */
    int dir_in = mode != M_BULK_OUT;
    int iso = mode == M_ISO_IN;
    uint32_t np = iso ? (uint32_t)iso_packets : 0;
    uint32_t xfer_len = iso ? (uint32_t)(size * iso_packets) : (uint32_t)size;
    size_t tmpl_len = HDR_LEN + (size_t)np * ISO_DESC_LEN;
    uint8_t *tmpl = calloc(1, tmpl_len);
    if (tmpl == NULL) {
        perror("loadgen: calloc");
        return 2;
    }
    put_be32(tmpl, CMD_SUBMIT);
    put_be32(tmpl + 8, devid);
    put_be32(tmpl + 12, dir_in ? 1 : 0);
    put_be32(tmpl + 16, (uint32_t)ep);
    put_be32(tmpl + 20, iso ? URB_ISO_ASAP : 0);
    put_be32(tmpl + 24, xfer_len);
    put_be32(tmpl + 28, 0);          /* start_frame */
    put_be32(tmpl + 32, np);         /* number_of_packets: 0 if not iso */
    put_be32(tmpl + 36, iso ? 1 : 0); /* interval */
    if (mode == M_CONTROL) {
        static const uint8_t setup[8] = {0x80, 0x06, 0x00, 0x01,
                                         0x00, 0x00, 0x12, 0x00};
        memcpy(tmpl + 40, setup, 8);
    }
    for (uint32_t i = 0; i < np; i++) {
        uint8_t *d = tmpl + HDR_LEN + (size_t)i * ISO_DESC_LEN;
        put_be32(d, (uint32_t)(i * (uint32_t)size));
        put_be32(d + 4, (uint32_t)size);
    }

    uint32_t tsize = 1;
    while (tsize < (uint32_t)inflight * 2 || tsize < 65536)
        tsize <<= 1;
    tbl = calloc(tsize, sizeof *tbl);
    tbl_mask = tsize - 1;

    uint8_t *rbuf = malloc(RBUF_SIZE);
    uint8_t *payload = NULL;
    if (mode == M_BULK_OUT && size > 0) {
        payload = malloc((size_t)size);
        if (payload != NULL)
            memset(payload, (int)out_byte, (size_t)size);
    }
    size_t wcap = (size_t)inflight * tmpl_len;
    if (wcap > WBUF_MAX)
        wcap = WBUF_MAX;
    if (wcap < tmpl_len)
        wcap = tmpl_len;
    struct wctx *w = calloc(1, sizeof *w);
    if (tbl == NULL || rbuf == NULL || w == NULL ||
        (mode == M_BULK_OUT && size > 0 && payload == NULL)) {
        perror("loadgen: malloc");
        return 2;
    }
    w->buf = malloc(wcap);
    if (w->buf == NULL) {
        perror("loadgen: malloc");
        return 2;
    }
    w->fd = fd;
    w->cap = wcap;
    w->tmpl = tmpl;
    w->tmpl_len = tmpl_len;
    w->payload = payload;
    w->payload_len = payload != NULL ? (size_t)size : 0;

    /* ---- run ---- */
    uint64_t errors = 0, urbs = 0, bytes = 0, nreads = 0;
    int64_t t_start = now_ns();
    int64_t t_meas = t_start + (int64_t)(warmup * 1e9);
    int64_t t_end = t_meas + (int64_t)(seconds * 1e9);
    int64_t t_drain_deadline = t_end + DRAIN_NS;
    int stopped = 0;
    int fatal = 0;

    if (submit_n(w, inflight) < 0) {
        fprintf(stderr, "loadgen: write failed: %s\n", strerror(errno));
        fatal = 1;
    }

    size_t rlen = 0;
    uint64_t skip = 0;       /* payload/descriptor bytes still to skip */
    int pending = 0;         /* a reply waits for its payload */
    int pending_ok = 0;
    int pending_freed = 0;   /* it completed one of our in-flight URBs */
    int64_t pending_tsub = 0;
    uint32_t pending_actual = 0;

    while (!fatal) {
        ssize_t n = read(fd, rbuf + rlen, RBUF_SIZE - rlen);
        int64_t t = now_ns();
        nreads++;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                fprintf(stderr, "loadgen: read failed: %s\n", strerror(errno));
                fatal = 1;
                break;
            }
            n = 0;
        } else if (n == 0) {
            fprintf(stderr, "loadgen: server closed the connection\n");
            fatal = 1;
            break;
        }
        rlen += (size_t)n;

        long completed = 0;
        size_t pos = 0;
        for (;;) {
            if (skip > 0) {
                size_t avail = rlen - pos;
                size_t take = skip < avail ? (size_t)skip : avail;
                pos += take;
                skip -= take;
                if (skip > 0)
                    break;
            }
            if (pending) {
                /* completion = last byte of the reply received */
                pending = 0;
                if (pending_freed)
                    completed++;
                if (pending_ok && t >= t_meas && t < t_end) {
                    urbs++;
                    bytes += pending_actual;
                    hist_add(t - pending_tsub);
                }
            }
            if (rlen - pos < HDR_LEN)
                break;
            const uint8_t *h = rbuf + pos;
            pos += HDR_LEN;
            uint32_t cmd = get_be32(h);
            uint32_t seq = get_be32(h + 4);
            if (cmd != RET_SUBMIT) {
                fprintf(stderr, "loadgen: unexpected reply command %u\n", cmd);
                fatal = 1;
                break;
            }
            int32_t status = (int32_t)get_be32(h + 20);
            int32_t actual = (int32_t)get_be32(h + 24);
            uint32_t rnp = get_be32(h + 32);
            if (actual < 0 || (uint32_t)actual > xfer_len) {
                fprintf(stderr, "loadgen: bad actual_length %d (seq %u)\n",
                        actual, seq);
                fatal = 1;
                break;
            }
            if (rnp == 0xffffffffu || !iso)
                rnp = 0;
            if (rnp > MAX_PACKETS) {
                fprintf(stderr, "loadgen: bad number_of_packets %u\n", rnp);
                fatal = 1;
                break;
            }
            struct slot *s = &tbl[seq & tbl_mask];
            pending_ok = 1;
            pending_freed = 0;
            pending_tsub = t;
            if (seq == 0 || s->seq != seq) {
                errors++; /* unknown seqnum: no slot to refill */
                pending_ok = 0;
            } else {
                s->seq = 0;
                outstanding--;
                pending_freed = 1;
                pending_tsub = s->t_sub;
                if (status != 0) {
                    errors++;
                    pending_ok = 0;
                }
            }
            pending = 1;
            pending_actual = (uint32_t)actual;
            skip = (dir_in ? (uint64_t)actual : 0) +
                   (uint64_t)rnp * ISO_DESC_LEN;
        }
        if (fatal)
            break;

        if (pos < rlen)
            memmove(rbuf, rbuf + pos, rlen - pos);
        rlen -= pos;

        if (!stopped && t >= t_end)
            stopped = 1;
        if (!stopped && completed > 0) {
            if (submit_n(w, completed) < 0) {
                fprintf(stderr, "loadgen: write failed: %s\n",
                        strerror(errno));
                fatal = 1;
                break;
            }
        }
        if (stopped && outstanding == 0 && !pending)
            break;
        if (stopped && t >= t_drain_deadline) {
            fprintf(stderr,
                    "loadgen: %ld URBs still outstanding after drain timeout\n",
                    outstanding);
            break;
        }
    }
    if (outstanding > 0)
        errors += (uint64_t)outstanding;

    double meas = (double)(t_end - t_meas) / 1e9;
    if (fatal) {
        int64_t t = now_ns();
        if (t < t_end)
            meas = t > t_meas ? (double)(t - t_meas) / 1e9 : 0;
        if (errors == 0)
            errors = 1;
    }
    close(fd);
    if (getenv("LOADGEN_STATS") != NULL)
        fprintf(stderr, "loadgen: %llu reads, %llu submits\n",
                (unsigned long long)nreads, (unsigned long long)next_seq);

    double ups = meas > 0 ? (double)urbs / meas : 0;
    double mbps = meas > 0 ? (double)bytes / 1e6 / meas : 0;
    double p50 = hist_quantile(0.50), p99 = hist_quantile(0.99);
    printf("{\"mode\":\"%s\",\"size\":%ld,\"inflight\":%ld,", mode_names[mode],
           size, inflight);
    printf("\"seconds\":%.3f,\"urbs\":%llu,", meas, (unsigned long long)urbs);
    printf("\"urbs_per_s\":%.1f,\"mb_per_s\":%.3f,", ups, mbps);
    print_num("p50_us", p50 < 0 ? -1 : p50 / 1000.0, 1);
    print_num("p99_us", p99 < 0 ? -1 : p99 / 1000.0, 1);
    printf("\"errors\":%llu}\n", (unsigned long long)errors);
    fflush(stdout);
    return (errors > 0 || urbs == 0) ? 1 : 0;
}
