/*
 * Byte-level helpers for the USB/IP wire format, declared for Cython in usbip/protocol/_wire.pxd
 * and used by the compiled codec (usbip/protocol/codec.py built as usbip.protocol._codec).
 *
 * struct usbip_header (48 bytes) and struct usbip_iso_packet_descriptor (16 bytes)
 * are laid out in drivers/usb/usbip/usbip_common.h: every field a big-endian 32-bit
 * integer, except the 8-byte setup packet, which is copied as is.
 */
#ifndef CYUSBIP_WIRE_H
#define CYUSBIP_WIRE_H

#include <stdint.h>
#include <string.h>

#define USBIP_HEADER_SIZE 48
#define USBIP_ISO_DESC_SIZE 16

static inline uint32_t usbip_get_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline void usbip_put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Header as ten 32-bit words, then the 8-byte setup packet (CMD_SUBMIT) or zeros. */
static inline void usbip_unpack_words(const unsigned char *p, uint32_t w[10])
{
    for (int i = 0; i < 10; i++)
        w[i] = usbip_get_be32(p + 4 * i);
}

static inline void usbip_pack_words(unsigned char *p, const uint32_t w[10], const unsigned char *setup)
{
    for (int i = 0; i < 10; i++)
        usbip_put_be32(p + 4 * i, w[i]);
    if (setup)
        memcpy(p + 40, setup, 8);
    else
        memset(p + 40, 0, 8);
}

/*
 * Iso descriptors are kept as they travel: n records of 16 bytes (offset, length,
 * actual_length, status), each a big-endian 32-bit word. IsoPackets stores that
 * array as is, so unpacking and packing descriptors is a copy.
 */
static inline void usbip_iso_put(unsigned char *p, uint32_t offset, uint32_t length, uint32_t actual,
                                 int32_t status)
{
    usbip_put_be32(p, offset);
    usbip_put_be32(p + 4, length);
    usbip_put_be32(p + 8, actual);
    usbip_put_be32(p + 12, (uint32_t)status);
}

#define USBIP_ISO_OFFSET(d, i) usbip_get_be32((d) + USBIP_ISO_DESC_SIZE * (i))
#define USBIP_ISO_LENGTH(d, i) usbip_get_be32((d) + USBIP_ISO_DESC_SIZE * (i) + 4)
#define USBIP_ISO_ACTUAL(d, i) usbip_get_be32((d) + USBIP_ISO_DESC_SIZE * (i) + 8)
#define USBIP_ISO_STATUS(d, i) ((int32_t)usbip_get_be32((d) + USBIP_ISO_DESC_SIZE * (i) + 12))

/* Index of the first packet outside a buffer of buflen bytes or with actual_length > length; -1 if none. */
static inline int usbip_iso_first_bad(const unsigned char *d, int n, uint64_t buflen)
{
    for (int i = 0; i < n; i++) {
        if ((uint64_t)USBIP_ISO_OFFSET(d, i) + USBIP_ISO_LENGTH(d, i) > buflen)
            return i;
        if (USBIP_ISO_ACTUAL(d, i) > USBIP_ISO_LENGTH(d, i))
            return i;
    }
    return -1;
}

static inline uint64_t usbip_iso_total(const unsigned char *d, int n)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; i++)
        sum += USBIP_ISO_ACTUAL(d, i);
    return sum;
}

static inline int usbip_iso_errors(const unsigned char *d, int n)
{
    int c = 0;
    for (int i = 0; i < n; i++)
        c += USBIP_ISO_STATUS(d, i) != 0;
    return c;
}

/* Copy each packet's actual bytes from src (at its offset) to dst back to back. */
static inline int64_t usbip_iso_gather(const unsigned char *src, uint64_t srclen, unsigned char *dst,
                                       uint64_t dstlen, const unsigned char *d, int n)
{
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        uint64_t off = USBIP_ISO_OFFSET(d, i), a = USBIP_ISO_ACTUAL(d, i);
        if (off + a > srclen || pos + a > dstlen)
            return -1;
        memcpy(dst + pos, src + off, a);
        pos += a;
    }
    return (int64_t)pos;
}

/*
 * In place: packets stored back to back at buf[0:actual] move to their offsets,
 * last first (as usbip_pad_iso in usbip_common.c). The caller has checked that
 * the actual lengths add up to `actual`.
 */
static inline int usbip_iso_spread(unsigned char *buf, uint64_t buflen, uint64_t actual, const unsigned char *d,
                                   int n)
{
    uint64_t pos = actual;
    if (actual > buflen)
        return -1;
    for (int i = n - 1; i >= 0; i--) {
        uint64_t off = USBIP_ISO_OFFSET(d, i), a = USBIP_ISO_ACTUAL(d, i);
        pos -= a;
        if (off + a > buflen)
            return -1;
        if (off != pos && a)
            memmove(buf + off, buf + pos, a);
    }
    return 0;
}

/* Sum of the packets' lengths (what the device is asked to move). */
static inline uint64_t usbip_iso_total_length(const unsigned char *d, int n)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; i++)
        sum += USBIP_ISO_LENGTH(d, i);
    return sum;
}

/*
 * Every packet's result as a device that moves at most max_packet bytes a packet sets it:
 * a packet inside a buffer of buflen bytes gets actual_length min(length, max_packet) (clamp)
 * and status 0, or, without clamp, overflow when length > max_packet; a packet outside the
 * buffer gets actual_length 0 and status overflow. Returns the sum of the actual lengths.
 */
static inline uint64_t usbip_iso_set_results(unsigned char *d, int n, uint64_t buflen, uint32_t max_packet,
                                             int clamp, int32_t overflow)
{
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        unsigned char *p = d + USBIP_ISO_DESC_SIZE * i;
        uint64_t off = usbip_get_be32(p);
        uint32_t len = usbip_get_be32(p + 4), actual = len;
        int32_t status = 0;
        if (off + len > buflen || (!clamp && len > max_packet)) {
            actual = 0;
            status = overflow;
        } else if (len > max_packet) {
            actual = max_packet;
        }
        usbip_put_be32(p + 8, actual);
        usbip_put_be32(p + 12, (uint32_t)status);
        total += actual;
    }
    return total;
}

/* Each packet's first actual_length bytes of src copied to its offset in buf; -1 if one does not fit. */
static inline int usbip_iso_fill(unsigned char *buf, uint64_t buflen, const unsigned char *src, uint64_t srclen,
                                 const unsigned char *d, int n)
{
    for (int i = 0; i < n; i++) {
        uint64_t off = USBIP_ISO_OFFSET(d, i), a = USBIP_ISO_ACTUAL(d, i);
        if (a == 0)
            continue;
        if (off + a > buflen || a > srclen)
            return -1;
        memcpy(buf + off, src, a);
    }
    return 0;
}

/* Packets with status 0 whose actual_length bytes at their offset in buf are not the start of pat. */
static inline int usbip_iso_mismatches(const unsigned char *buf, uint64_t buflen, const unsigned char *pat,
                                       uint64_t patlen, const unsigned char *d, int n)
{
    int bad = 0;
    for (int i = 0; i < n; i++) {
        uint64_t off = USBIP_ISO_OFFSET(d, i), a = USBIP_ISO_ACTUAL(d, i);
        if (USBIP_ISO_STATUS(d, i) != 0)
            continue;
        if (off + a > buflen || a > patlen || memcmp(buf + off, pat, a) != 0)
            bad++;
    }
    return bad;
}

/* The sum of the actual lengths if the packets' data lie back to back from offset 0 (so the
 * data of a RET_SUBMIT is the buffer's first bytes as they are), else -1. */
static inline int64_t usbip_iso_contiguous(const unsigned char *d, int n)
{
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        uint64_t a = USBIP_ISO_ACTUAL(d, i);
        if (a && USBIP_ISO_OFFSET(d, i) != pos)
            return -1;
        pos += a;
    }
    return (int64_t)pos;
}

#endif
