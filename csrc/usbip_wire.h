/*
 * Byte-level helpers for the USB/IP wire format, used from usbip/protocol/_codec.pyx.
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

/* Header as twelve 32-bit words (the last two are the setup packet for CMD_SUBMIT). */
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

/* One iso descriptor: offset, length, actual_length, status. */
typedef struct {
    uint32_t offset;
    uint32_t length;
    uint32_t actual_length;
    int32_t status;
} usbip_iso_desc;

static inline void usbip_iso_unpack(const unsigned char *p, usbip_iso_desc *d, int n)
{
    for (int i = 0; i < n; i++, p += USBIP_ISO_DESC_SIZE) {
        d[i].offset = usbip_get_be32(p);
        d[i].length = usbip_get_be32(p + 4);
        d[i].actual_length = usbip_get_be32(p + 8);
        d[i].status = (int32_t)usbip_get_be32(p + 12);
    }
}

static inline void usbip_iso_pack(unsigned char *p, const usbip_iso_desc *d, int n)
{
    for (int i = 0; i < n; i++, p += USBIP_ISO_DESC_SIZE) {
        usbip_put_be32(p, d[i].offset);
        usbip_put_be32(p + 4, d[i].length);
        usbip_put_be32(p + 8, d[i].actual_length);
        usbip_put_be32(p + 12, (uint32_t)d[i].status);
    }
}

/*
 * Checks that every packet lies inside a buffer of buflen bytes and that
 * actual_length <= length. Returns -1 when all is well, else the index of the
 * first bad packet; *total gets the sum of actual lengths.
 */
static inline int usbip_iso_check(const usbip_iso_desc *d, int n, uint64_t buflen, uint64_t *total,
                                  int *why)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) {
        if ((uint64_t)d[i].offset + d[i].length > buflen) {
            *why = 1;
            return i;
        }
        if (d[i].actual_length > d[i].length) {
            *why = 2;
            return i;
        }
        sum += d[i].actual_length;
    }
    *total = sum;
    return -1;
}

/* Copy each packet's actual bytes from src (at its offset) to dst back to back. */
static inline int64_t usbip_iso_gather(const unsigned char *src, uint64_t srclen, unsigned char *dst,
                                       uint64_t dstlen, const usbip_iso_desc *d, int n)
{
    uint64_t pos = 0;
    for (int i = 0; i < n; i++) {
        uint64_t a = d[i].actual_length;
        if ((uint64_t)d[i].offset + a > srclen || pos + a > dstlen)
            return -1;
        memcpy(dst + pos, src + d[i].offset, a);
        pos += a;
    }
    return (int64_t)pos;
}

/*
 * In place: packets stored back to back at buf[0:actual] move to their offsets,
 * last first (as usbip_pad_iso in usbip_common.c). The caller has checked that
 * the actual lengths add up to `actual`.
 */
static inline int usbip_iso_spread(unsigned char *buf, uint64_t buflen, uint64_t actual,
                                   const usbip_iso_desc *d, int n)
{
    uint64_t pos = actual;
    if (actual > buflen)
        return -1;
    for (int i = n - 1; i >= 0; i--) {
        uint64_t a = d[i].actual_length;
        pos -= a;
        if ((uint64_t)d[i].offset + a > buflen)
            return -1;
        if (d[i].offset != pos && a)
            memmove(buf + d[i].offset, buf + pos, a);
    }
    return 0;
}

#endif
