/*
 * ceiling.c - minimal, fast USB/IP server used as a performance "ceiling".
 *
 * Usage: ceiling --port P [--host 127.0.0.1]
 *
 * Prints "ceiling: listening on <host> port <port>" to stdout once ready
 * (--port 0 picks a free port).  Exit 2 on usage/bind errors.
 *
 * Exports one device (busid "1-1", busnum 1, devnum 2, high speed,
 * 0525:a4a0, one vendor-specific interface with ep1 bulk IN/OUT (512) and
 * ep2 iso IN (wMaxPacketSize 0x0400: 1024 bytes, one per microframe, as the
 * loopback device's iso source, so that both servers move the same packets)).
 * Every URB completes immediately:
 *   - bulk/int IN:  transfer_buffer_length zero bytes, status 0
 *   - OUT:          data discarded, actual_length = transfer_buffer_length
 *   - iso IN:       every packet full, status 0, error_count 0
 *   - ep0:          GET_DESCRIPTOR device / configuration / string,
 *                   everything else succeeds with 0 bytes
 *                   (GET_DESCRIPTOR of an unknown type stalls: -EPIPE)
 *   - CMD_UNLINK:   RET_UNLINK status 0 (URB already given back)
 *
 * One process per connection (fork).  Per connection: large reads, every
 * complete request of a read is answered, all replies of one read leave
 * with one writev().  Only libc, C99/gnu11.
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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#define USBIP_VERSION 0x0111
#define OP_REQ_DEVLIST 0x8005
#define OP_REP_DEVLIST 0x0005
#define OP_REQ_IMPORT 0x8003
#define OP_REP_IMPORT 0x0003

#define CMD_SUBMIT 1
#define CMD_UNLINK 2
#define RET_SUBMIT 3
#define RET_UNLINK 4

#define HDR_LEN 48
#define ISO_DESC_LEN 16
#define DEV_REC_LEN 312

#define MAX_XFER (16u * 1024u * 1024u) /* transfer_buffer_length bound */
#define MAX_PACKETS 1024u              /* iso packets bound */

#define RBUF_SIZE (1u << 20)           /* read buffer */
#define ARENA_SIZE (4u << 20)          /* reply headers + small payloads */
#define IOV_CAP 4096
#define SMALL_COPY 4096                /* IN payloads <= this are copied */

#define BUSNUM 1
#define DEVNUM 2
#define BUSID "1-1"

#define EPIPE_STATUS (-32)

/* ------------------------------------------------------------------ */
/* descriptors                                                         */

static const uint8_t dev_desc[18] = {
    18, 0x01, 0x00, 0x02, /* bLength, DEVICE, bcdUSB 2.00 */
    0x00, 0x00, 0x00, 64, /* class/subclass/protocol per interface, mps0 */
    0x25, 0x05, 0xa0, 0xa4, /* idVendor 0x0525, idProduct 0xa4a0 */
    0x00, 0x01,           /* bcdDevice 1.00 */
    1, 2, 3,              /* iManufacturer, iProduct, iSerial */
    1,                    /* bNumConfigurations */
};

static const uint8_t cfg_desc[9 + 9 + 7 * 3] = {
    /* configuration */
    9, 0x02, 39, 0, 1, 1, 0, 0x80, 50,
    /* interface 0, alt 0, 3 endpoints, vendor specific */
    9, 0x04, 0, 0, 3, 0xff, 0x00, 0x00, 0,
    /* ep1 bulk IN, 512 */
    7, 0x05, 0x81, 0x02, 0x00, 0x02, 0,
    /* ep1 bulk OUT, 512 */
    7, 0x05, 0x01, 0x02, 0x00, 0x02, 0,
    /* ep2 iso IN (async), 1024 x 1 per microframe (the loopback's iso maxp), interval 1 */
    7, 0x05, 0x82, 0x05, 0x00, 0x04, 1,
};

static const uint8_t str0_desc[4] = {4, 0x03, 0x09, 0x04};
/* "cyusbip", "ceiling", "0001" in UTF-16LE */
static const uint8_t str1_desc[] = {16, 3, 'c', 0, 'y', 0, 'u', 0, 's', 0,
                                    'b', 0, 'i', 0, 'p', 0};
static const uint8_t str2_desc[] = {16, 3, 'c', 0, 'e', 0, 'i', 0, 'l', 0,
                                    'i', 0, 'n', 0, 'g', 0};
static const uint8_t str3_desc[] = {10, 3, '0', 0, '0', 0, '0', 0, '1', 0};

/* Source of IN payload bytes for large transfers (bss, all zero). */
static uint8_t zeros[MAX_XFER];

/* ------------------------------------------------------------------ */
/* byte helpers                                                        */

static inline uint32_t get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint16_t get_be16(const uint8_t *p)
{
    return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
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

/* ------------------------------------------------------------------ */
/* output batching                                                     */

struct out {
    int fd;
    uint8_t *arena;
    size_t used;
    struct iovec iov[IOV_CAP];
    int niov;
};

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

static int out_flush(struct out *o)
{
    int rc = 0;
    if (o->niov > 0)
        rc = writev_all(o->fd, o->iov, o->niov);
    o->niov = 0;
    o->used = 0;
    return rc;
}

/* Append an iovec, merging with the previous one when contiguous. */
static void out_iov(struct out *o, const void *p, size_t len)
{
    if (len == 0)
        return;
    if (o->niov > 0) {
        struct iovec *last = &o->iov[o->niov - 1];
        if ((const uint8_t *)last->iov_base + last->iov_len ==
            (const uint8_t *)p) {
            last->iov_len += len;
            return;
        }
    }
    o->iov[o->niov].iov_base = (void *)p;
    o->iov[o->niov].iov_len = len;
    o->niov++;
}

/*
 * Make sure a reply needing `arena_bytes` of arena and up to `iovs`
 * iovecs fits; flush first otherwise.  Returns -1 on write error.
 */
static int out_reserve(struct out *o, size_t arena_bytes, int iovs)
{
    if (o->used + arena_bytes > ARENA_SIZE || o->niov + iovs > IOV_CAP)
        return out_flush(o);
    return 0;
}

/* Arena allocation; caller must have reserved. */
static uint8_t *out_alloc(struct out *o, size_t len)
{
    uint8_t *p = o->arena + o->used;
    o->used += len;
    return p;
}

/* ------------------------------------------------------------------ */
/* connection state                                                    */

enum { PH_OP, PH_URB };
enum { ST_HDR, ST_SKIP, ST_DESC };

struct cmd {
    uint32_t seqnum;
    uint32_t direction;
    uint32_t ep;
    uint32_t tbl;       /* transfer_buffer_length */
    uint32_t npackets;  /* 0 for non-iso */
    uint8_t setup[8];
};

struct conn {
    int fd;
    int phase;
    int state;
    uint64_t skip;      /* OUT payload bytes still to discard */
    struct cmd cur;     /* command being received */
    struct out out;
};

static void fill_dev_record(uint8_t *r)
{
    memset(r, 0, DEV_REC_LEN);
    snprintf((char *)r, 256, "/sys/devices/platform/cyusbip-ceiling/usb1/%s",
             BUSID);
    snprintf((char *)r + 256, 32, "%s", BUSID);
    uint8_t *p = r + 288;
    put_be32(p, BUSNUM);
    put_be32(p + 4, DEVNUM);
    put_be32(p + 8, 3); /* high speed */
    put_be16(p + 12, 0x0525);
    put_be16(p + 14, 0xa4a0);
    put_be16(p + 16, 0x0100);
    p[18] = 0; /* bDeviceClass */
    p[19] = 0;
    p[20] = 0;
    p[21] = 1; /* bConfigurationValue */
    p[22] = 1; /* bNumConfigurations */
    p[23] = 1; /* bNumInterfaces */
}

/* Build a RET_SUBMIT header in the arena. */
static void put_ret_submit(uint8_t *h, uint32_t seqnum, int32_t status,
                           uint32_t actual, uint32_t npackets)
{
    memset(h, 0, HDR_LEN);
    put_be32(h, RET_SUBMIT);
    put_be32(h + 4, seqnum);
    put_be32(h + 20, (uint32_t)status);
    put_be32(h + 24, actual);
    put_be32(h + 28, 0);        /* start_frame */
    put_be32(h + 32, npackets); /* number_of_packets */
    put_be32(h + 36, 0);        /* error_count */
}

/* Reply with optional IN data (non-iso). */
static int reply_simple(struct out *o, uint32_t seqnum, int32_t status,
                        uint32_t actual, const uint8_t *data, size_t dlen)
{
    int copy = data != NULL && dlen > 0 && dlen <= SMALL_COPY;
    if (out_reserve(o, HDR_LEN + (copy ? dlen : 0), 2) < 0)
        return -1;
    uint8_t *h = out_alloc(o, HDR_LEN);
    put_ret_submit(h, seqnum, status, actual, 0);
    out_iov(o, h, HDR_LEN);
    if (data != NULL && dlen > 0) {
        if (copy) {
            uint8_t *d = out_alloc(o, dlen);
            memcpy(d, data, dlen);
            out_iov(o, d, dlen);
        } else {
            out_iov(o, data, dlen);
        }
    }
    return 0;
}

static int handle_control(struct out *o, const struct cmd *c)
{
    const uint8_t *s = c->setup;
    uint8_t bmRequestType = s[0];
    uint8_t bRequest = s[1];
    uint16_t wValue = (uint16_t)(s[2] | (s[3] << 8));
    uint16_t wLength = (uint16_t)(s[6] | (s[7] << 8));

    if (c->direction == 0) {
        /* OUT / no-data requests: SET_CONFIGURATION, SET_INTERFACE, ... */
        return reply_simple(o, c->seqnum, 0, c->tbl, NULL, 0);
    }

    const uint8_t *d = NULL;
    size_t dlen = 0;
    if ((bmRequestType & 0x60) == 0 && bRequest == 6) { /* GET_DESCRIPTOR */
        uint8_t type = (uint8_t)(wValue >> 8), idx = (uint8_t)wValue;
        switch (type) {
        case 1:
            d = dev_desc;
            dlen = sizeof dev_desc;
            break;
        case 2:
            if (idx == 0) {
                d = cfg_desc;
                dlen = sizeof cfg_desc;
            }
            break;
        case 3:
            if (idx == 0) {
                d = str0_desc;
                dlen = sizeof str0_desc;
            } else if (idx == 1) {
                d = str1_desc;
                dlen = sizeof str1_desc;
            } else if (idx == 2) {
                d = str2_desc;
                dlen = sizeof str2_desc;
            } else if (idx == 3) {
                d = str3_desc;
                dlen = sizeof str3_desc;
            }
            break;
        default:
            break;
        }
        if (d == NULL) /* unknown descriptor: stall like a real device */
            return reply_simple(o, c->seqnum, EPIPE_STATUS, 0, NULL, 0);
        if (dlen > wLength)
            dlen = wLength;
        if (dlen > c->tbl)
            dlen = c->tbl;
        return reply_simple(o, c->seqnum, 0, (uint32_t)dlen, d, dlen);
    }
    /* any other IN request succeeds with 0 bytes */
    return reply_simple(o, c->seqnum, 0, 0, NULL, 0);
}

/* Non-iso, non-control completion. */
static int handle_bulk(struct out *o, const struct cmd *c)
{
    if (c->direction == 1)
        return reply_simple(o, c->seqnum, 0, c->tbl, zeros, c->tbl);
    return reply_simple(o, c->seqnum, 0, c->tbl, NULL, 0);
}

/* Iso completion; descs points at npackets request descriptors. */
static int handle_iso(struct out *o, const struct cmd *c, const uint8_t *descs)
{
    uint32_t np = c->npackets;
    uint64_t total = 0;
    for (uint32_t i = 0; i < np; i++) {
        const uint8_t *d = descs + (size_t)i * ISO_DESC_LEN;
        uint64_t off = get_be32(d), len = get_be32(d + 4);
        if (off + len > c->tbl)
            return -1;
        total += len;
    }
    if (total > c->tbl)
        return -1;

    int in = c->direction == 1;
    int copy = in && total <= SMALL_COPY;
    size_t arena = HDR_LEN + (copy ? total : 0) + (size_t)np * ISO_DESC_LEN;
    if (out_reserve(o, arena, 3) < 0)
        return -1;
    uint8_t *h = out_alloc(o, HDR_LEN);
    put_ret_submit(h, c->seqnum, 0, (uint32_t)total, np);
    out_iov(o, h, HDR_LEN);
    if (in && total > 0) {
        if (copy) {
            uint8_t *p = out_alloc(o, total);
            memset(p, 0, total);
            out_iov(o, p, total);
        } else {
            out_iov(o, zeros, total);
        }
    }
    uint8_t *rd = out_alloc(o, (size_t)np * ISO_DESC_LEN);
    for (uint32_t i = 0; i < np; i++) {
        const uint8_t *d = descs + (size_t)i * ISO_DESC_LEN;
        uint8_t *r = rd + (size_t)i * ISO_DESC_LEN;
        memcpy(r, d, 8);                /* offset, length */
        memcpy(r + 8, d + 4, 4);        /* actual_length = length */
        put_be32(r + 12, 0);            /* status */
    }
    out_iov(o, rd, (size_t)np * ISO_DESC_LEN);
    return 0;
}

static int complete_cmd(struct conn *cn, const uint8_t *descs)
{
    const struct cmd *c = &cn->cur;
    if (c->npackets > 0)
        return handle_iso(&cn->out, c, descs);
    if (c->ep == 0)
        return handle_control(&cn->out, c);
    return handle_bulk(&cn->out, c);
}

/*
 * Parse URB-phase data in buf[0..len).  Returns bytes consumed, or -1
 * to close the connection.
 */
static ssize_t parse_urbs(struct conn *cn, const uint8_t *buf, size_t len)
{
    size_t pos = 0;
    for (;;) {
        if (cn->state == ST_SKIP) {
            size_t avail = len - pos;
            size_t take = cn->skip < avail ? (size_t)cn->skip : avail;
            pos += take;
            cn->skip -= take;
            if (cn->skip > 0)
                break;
            if (cn->cur.npackets > 0) {
                cn->state = ST_DESC;
            } else {
                if (complete_cmd(cn, NULL) < 0)
                    return -1;
                cn->state = ST_HDR;
            }
            continue;
        }
        if (cn->state == ST_DESC) {
            size_t need = (size_t)cn->cur.npackets * ISO_DESC_LEN;
            if (len - pos < need)
                break;
            if (complete_cmd(cn, buf + pos) < 0)
                return -1;
            pos += need;
            cn->state = ST_HDR;
            continue;
        }
        /* ST_HDR */
        if (len - pos < HDR_LEN)
            break;
        const uint8_t *h = buf + pos;
        uint32_t command = get_be32(h);
        uint32_t seqnum = get_be32(h + 4);
        uint32_t direction = get_be32(h + 12);
        uint32_t ep = get_be32(h + 16);
        pos += HDR_LEN;

        if (command == CMD_UNLINK) {
            if (out_reserve(&cn->out, HDR_LEN, 1) < 0)
                return -1;
            uint8_t *r = out_alloc(&cn->out, HDR_LEN);
            memset(r, 0, HDR_LEN);
            put_be32(r, RET_UNLINK);
            put_be32(r + 4, seqnum);
            /* status 0: the URB has already been given back */
            out_iov(&cn->out, r, HDR_LEN);
            continue;
        }
        if (command != CMD_SUBMIT)
            return -1;
        if (direction > 1 || ep > 15)
            return -1;

        int32_t tbl = (int32_t)get_be32(h + 24);
        uint32_t np = get_be32(h + 32);
        if (tbl < 0 || (uint32_t)tbl > MAX_XFER)
            return -1;
        if (np == 0xffffffffu)
            np = 0;
        if (np > MAX_PACKETS)
            return -1;

        struct cmd *c = &cn->cur;
        c->seqnum = seqnum;
        c->direction = direction;
        c->ep = ep;
        c->tbl = (uint32_t)tbl;
        c->npackets = np;
        memcpy(c->setup, h + 40, 8);

        if (direction == 0 && tbl > 0) {
            cn->skip = (uint64_t)tbl;
            cn->state = ST_SKIP;
        } else if (np > 0) {
            cn->state = ST_DESC;
        } else {
            if (complete_cmd(cn, NULL) < 0)
                return -1;
        }
    }
    return (ssize_t)pos;
}

/*
 * Parse operation-phase data.  Returns bytes consumed, -1 to close.
 * Switches cn->phase to PH_URB after a successful import.
 */
static ssize_t parse_op(struct conn *cn, const uint8_t *buf, size_t len)
{
    if (len < 8)
        return 0;
    uint16_t code = get_be16(buf + 2);
    uint8_t rep[8 + 4 + DEV_REC_LEN + 4];
    if (code == OP_REQ_DEVLIST) {
        put_be16(rep, USBIP_VERSION);
        put_be16(rep + 2, OP_REP_DEVLIST);
        put_be32(rep + 4, 0);
        put_be32(rep + 8, 1);
        fill_dev_record(rep + 12);
        uint8_t *ifr = rep + 12 + DEV_REC_LEN;
        ifr[0] = 0xff;
        ifr[1] = 0;
        ifr[2] = 0;
        ifr[3] = 0;
        struct iovec iov = {rep, sizeof rep};
        writev_all(cn->fd, &iov, 1);
        return -1; /* one op per connection */
    }
    if (code == OP_REQ_IMPORT) {
        if (len < 8 + 32)
            return 0;
        char busid[33];
        memcpy(busid, buf + 8, 32);
        busid[32] = 0;
        int ok = strcmp(busid, BUSID) == 0;
        put_be16(rep, USBIP_VERSION);
        put_be16(rep + 2, OP_REP_IMPORT);
        put_be32(rep + 4, ok ? 0 : 1);
        size_t n = 8;
        if (ok) {
            fill_dev_record(rep + 8);
            n += DEV_REC_LEN;
        }
        struct iovec iov = {rep, n};
        if (writev_all(cn->fd, &iov, 1) < 0 || !ok)
            return -1;
        cn->phase = PH_URB;
        cn->state = ST_HDR;
        return 8 + 32;
    }
    return -1;
}

static void serve(int fd)
{
    static uint8_t rbuf[RBUF_SIZE];
    struct conn *cn = calloc(1, sizeof *cn);
    if (cn == NULL)
        return;
    cn->fd = fd;
    cn->phase = PH_OP;
    cn->out.fd = fd;
    cn->out.arena = malloc(ARENA_SIZE);
    if (cn->out.arena == NULL)
        goto done;

    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, rbuf + len, RBUF_SIZE - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (n == 0)
            break;
        len += (size_t)n;

        size_t pos = 0;
        if (cn->phase == PH_OP) {
            ssize_t c = parse_op(cn, rbuf, len);
            if (c < 0)
                break;
            pos = (size_t)c;
        }
        if (cn->phase == PH_URB) {
            ssize_t c = parse_urbs(cn, rbuf + pos, len - pos);
            if (c < 0)
                break;
            pos += (size_t)c;
        }
        if (out_flush(&cn->out) < 0)
            break;
        if (pos < len)
            memmove(rbuf, rbuf + pos, len - pos);
        len -= pos;
        if (len == RBUF_SIZE) /* cannot happen with the bounds above */
            break;
    }
done:
    free(cn->out.arena);
    free(cn);
}

static void usage(const char *argv0)
{
    fprintf(stderr, "usage: %s --port P [--host 127.0.0.1]\n", argv0);
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    const char *port = NULL;
    static const struct option opts[] = {
        {"host", required_argument, NULL, 'h'},
        {"port", required_argument, NULL, 'p'},
        {"help", no_argument, NULL, '?'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "h:p:", opts, NULL)) != -1) {
        switch (ch) {
        case 'h':
            host = optarg;
            break;
        case 'p':
            port = optarg;
            break;
        default:
            usage(argv[0]);
        }
    }
    if (port == NULL || optind != argc)
        usage(argv[0]);

    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int gai = getaddrinfo(host, port, &hints, &res);
    if (gai != 0) {
        fprintf(stderr, "ceiling: %s:%s: %s\n", host, port, gai_strerror(gai));
        return 2;
    }
    int lfd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (lfd < 0) {
        perror("ceiling: socket");
        return 2;
    }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, res->ai_addr, res->ai_addrlen) < 0) {
        fprintf(stderr, "ceiling: bind %s:%s: %s\n", host, port,
                strerror(errno));
        return 2;
    }
    freeaddrinfo(res);
    if (listen(lfd, 64) < 0) {
        perror("ceiling: listen");
        return 2;
    }
    {
        /* report the bound port (useful with --port 0) */
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        char hbuf[NI_MAXHOST], pbuf[NI_MAXSERV];
        if (getsockname(lfd, (struct sockaddr *)&ss, &sl) == 0 &&
            getnameinfo((struct sockaddr *)&ss, sl, hbuf, sizeof hbuf, pbuf,
                        sizeof pbuf, NI_NUMERICHOST | NI_NUMERICSERV) == 0)
            printf("ceiling: listening on %s port %s\n", hbuf, pbuf);
        fflush(stdout);
    }
    signal(SIGCHLD, SIG_IGN); /* auto-reap connection children */
    signal(SIGPIPE, SIG_IGN);

    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE ||
                errno == ENFILE)
                continue;
            perror("ceiling: accept");
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(lfd);
            /* die with the listener so no stray servers survive it */
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            signal(SIGCHLD, SIG_DFL);
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            serve(fd);
            close(fd);
            _exit(0);
        }
        close(fd);
        if (pid < 0)
            perror("ceiling: fork");
    }
}
