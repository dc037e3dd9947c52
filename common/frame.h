/*
 * frame.h - the wire framing: a fixed 12-byte header, then one protobuf body.
 *
 * The decoder is a pure module (no sockets): bytes go in, whole frame bodies
 * come out.  It checks magic, version, flags and length as soon as the 12
 * header bytes are present, before it reserves any room for the body, so an
 * oversized or garbage frame is refused without allocating for it.
 */
#ifndef SBN_FRAME_H
#define SBN_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define SBN_FRAME_MAGIC 0x53424E46u /* "SBNF" */
#define SBN_PROTOCOL_VERSION 1u
#define SBN_FRAME_HEADER_SIZE 12u

/* Default and hard ceiling for a frame body; the daemon may lower the limit. */
#define SBN_MAX_FRAME_DEFAULT (64u * 1024u * 1024u)
#define SBN_MAX_FRAME_CEILING (1024u * 1024u * 1024u)
/* The smallest limit that still fits a hello or an error message. */
#define SBN_MAX_FRAME_FLOOR 1024u

/* Header fields, host order. */
typedef struct sbn__frame_header {
  uint32_t magic;
  uint16_t version;
  uint16_t flags;
  uint32_t length;
} sbn__frame_header;

void sbn__frame_header_write(uint8_t out[SBN_FRAME_HEADER_SIZE], uint32_t length);
void sbn__frame_header_read(const uint8_t in[SBN_FRAME_HEADER_SIZE],
                            sbn__frame_header *h);
/*
 * Checks a header against a body limit.  Returns SBN_OK, or SBN_EPROTO (bad
 * magic or flags), SBN_EVERSION, SBN_ETOOBIG, with a message in err.
 */
int sbn__frame_header_check(const sbn__frame_header *h, uint32_t max_frame,
                            char *err, size_t errlen);

/*
 * Incremental decoder.  The buffer grows on demand up to one header plus
 * max_frame plus one read of `slack` bytes; it never holds more.
 */
typedef struct sbn__framer {
  uint8_t *buf;
  size_t len;       /* bytes held */
  size_t cap;       /* bytes allocated */
  size_t off;       /* start of the unconsumed data */
  uint32_t max_frame;
  int error;        /* sticky: once a stream is bad it stays bad */
  char errmsg[160];
} sbn__framer;

void sbn__framer_init(sbn__framer *f, uint32_t max_frame);
void sbn__framer_release(sbn__framer *f);

/*
 * Room to read at most `want` bytes into: *space gets a pointer, the return
 * value the number of bytes available there (>= 1), or a negative status if
 * no room can be made (SBN_ENOMEM).  Follow with sbn__framer_commit().
 */
long sbn__framer_space(sbn__framer *f, size_t want, uint8_t **space);
void sbn__framer_commit(sbn__framer *f, size_t n);

/*
 * Trades f's buffer for *buf (*cap bytes, malloc'd or NULL): the bytes not
 * yet handed out as frames move to the front of *buf (grown when too small),
 * which f reads into from then on, and *buf gets f's old buffer, where the
 * frames already handed out stay valid.  SBN_OK, or SBN_ENOMEM with nothing
 * changed.
 */
int sbn__framer_swap_buf(sbn__framer *f, uint8_t **buf, size_t *cap);

/* Copies n bytes in (space + commit in one).  SBN_OK or a negative status. */
int sbn__framer_feed(sbn__framer *f, const void *data, size_t n);

/*
 * The next complete frame: returns 1 and sets *body and *len (valid until the
 * next call that changes the framer), 0 if more bytes are needed, or a
 * negative status if the stream is malformed (the message is in f->errmsg and
 * every later call returns the same status).
 */
int sbn__framer_next(sbn__framer *f, const uint8_t **body, size_t *len);

/* Bytes held that do not yet make a whole frame. */
size_t sbn__framer_pending(const sbn__framer *f);

#endif /* SBN_FRAME_H */
