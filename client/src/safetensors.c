/*
 * safetensors.c - state dicts to and from the safetensors format.
 *
 * Layout of a file: an 8-byte little-endian header length N, N bytes of JSON
 * describing every tensor (dtype, shape, data_offsets relative to the end of
 * the header), then the data.  The reader is written for hostile input: the
 * header is read only after its length has been checked against a limit and
 * the file's size, the JSON parser knows exactly the subset the format uses
 * and nothing else (so it has no recursion and no surprises), and every
 * offset is checked before any tensor is allocated, so the memory a file can
 * make us allocate is bounded by its own size.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "nn_internal.h"
#include "sbn/safetensors.h"

/* ---- defines ---------------------------------------------------------------- */

/* The header length field. */
#define ST_LEN_SIZE 8u
/* The writer pads the header with spaces so that the data starts at a
 * multiple of this (as the reference implementation does). */
#define ST_DATA_ALIGN 8u
#define ST_DTYPE_F32 "F32"
#define ST_F32_SIZE 4u
#define ST_METADATA_KEY "__metadata__"
/* Longest dtype name we keep for messages ("F8_E4M3" is the longest known). */
#define ST_DTYPE_MAX 32
/* Room for a message quoted inside another (sbn_last_error()'s size). */
#define ST_MSG_MAX 1024
/* Bytes of a tensor converted at a time on a big-endian host. */
#define ST_SWAP_CHUNK 4096u

/* ---- types ------------------------------------------------------------------ */

/* One tensor of a file, as its header describes it. */
typedef struct st_entry {
  char *key;
  size_t index; /* position in the header, to keep sorting deterministic */
  int ndim;     /* as in the file: 0 .. SBN_MAX_DIMS */
  size_t shape[SBN_MAX_DIMS];
  uint64_t begin, end;
} st_entry;

/* The header parser: the text, a cursor and what it found so far. */
typedef struct st_parser {
  const char *path;
  const char *s;
  size_t n, pos;
  st_entry *e;
  size_t count, cap;
} st_parser;

/* ---- byte order ------------------------------------------------------------- */

static int host_is_big_endian(void) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  return 1;
#else
  return 0;
#endif
}

static void swap4(void *p, size_t n) {
  uint8_t *b = p;
  for (size_t i = 0; i + 4 <= n; i += 4) {
    uint8_t t0 = b[i], t1 = b[i + 1];
    b[i] = b[i + 3];
    b[i + 1] = b[i + 2];
    b[i + 2] = t1;
    b[i + 3] = t0;
  }
}

static uint64_t le64_read(const uint8_t b[ST_LEN_SIZE]) {
  uint64_t v = 0;
  for (int i = ST_LEN_SIZE - 1; i >= 0; i--)
    v = (v << 8) | b[i];
  return v;
}

static void le64_write(uint8_t b[ST_LEN_SIZE], uint64_t v) {
  for (unsigned i = 0; i < ST_LEN_SIZE; i++)
    b[i] = (uint8_t)(v >> (8 * i));
}

/* ---- UTF-8 ------------------------------------------------------------------ */

/*
 * Length of the valid UTF-8 sequence at s (at most n bytes), or 0 when it is
 * not one (overlong forms, surrogates and code points above U+10FFFF are
 * invalid).
 */
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t len;
  uint32_t cp, min;
  if (c < 0x80)
    return 1;
  if (c >= 0xC2 && c <= 0xDF)
    len = 2, cp = c & 0x1F, min = 0x80;
  else if (c >= 0xE0 && c <= 0xEF)
    len = 3, cp = c & 0x0F, min = 0x800;
  else if (c >= 0xF0 && c <= 0xF4)
    len = 4, cp = c & 0x07, min = 0x10000;
  else
    return 0;
  if (len > n)
    return 0;
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80)
      return 0;
    cp = (cp << 6) | (s[i] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
    return 0;
  return len;
}

static size_t utf8_put(char *out, uint32_t cp) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* ---- the header parser ------------------------------------------------------ */

/* Fails with SBN_EINVAL naming the file and where in the header it went wrong. */
static int syntax_error(const st_parser *p, const char *what) {
  return sbn__fail(SBN_EINVAL, "'%s': bad safetensors header at byte %zu (file offset %zu): %s",
                   p->path, p->pos, p->pos + ST_LEN_SIZE, what);
}

static void skip_ws(st_parser *p) {
  while (p->pos < p->n) {
    char c = p->s[p->pos];
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
      break;
    p->pos++;
  }
}

/* Consumes c after optional whitespace, or fails with "expected <what>". */
static int expect(st_parser *p, char c, const char *what) {
  skip_ws(p);
  if (p->pos >= p->n || p->s[p->pos] != c) {
    char msg[96];
    snprintf(msg, sizeof(msg), "expected %s", what);
    return syntax_error(p, p->pos >= p->n ? "unexpected end of the header" : msg);
  }
  p->pos++;
  return SBN_OK;
}

/* After an object or array member: 1 for ',', 0 for the closing character. */
static int next_member(st_parser *p, char close, const char *what, int *more) {
  skip_ws(p);
  if (p->pos < p->n && p->s[p->pos] == ',') {
    p->pos++;
    *more = 1;
    return SBN_OK;
  }
  *more = 0;
  return expect(p, close, what);
}

static int hex4(const char *s, uint32_t *out) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) {
    char c = s[i];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= (uint32_t)(c - '0');
    else if (c >= 'a' && c <= 'f')
      v |= (uint32_t)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F')
      v |= (uint32_t)(c - 'A' + 10);
    else
      return -1;
  }
  *out = v;
  return 0;
}

/*
 * A JSON string at the cursor (after whitespace), decoded into a new
 * NUL-terminated string.  Escapes, including surrogate pairs, are decoded;
 * raw control characters, invalid UTF-8, lone surrogates and \u0000 (which a
 * C string cannot hold) are refused.
 */
static int parse_string(st_parser *p, char **out) {
  int rc = expect(p, '"', "'\"' (a string)");
  if (rc != SBN_OK)
    return rc;
  /* The decoded string is never longer than its encoding. */
  size_t start = p->pos, end = start;
  while (end < p->n && p->s[end] != '"')
    end += p->s[end] == '\\' ? 2 : 1;
  if (end >= p->n)
    return syntax_error(p, "unterminated string");
  char *s = malloc(end - start + 1);
  if (!s)
    return sbn__fail(SBN_ENOMEM, "'%s': out of memory reading the header", p->path);
  size_t len = 0;
  while (p->s[p->pos] != '"') {
    unsigned char c = (unsigned char)p->s[p->pos];
    if (c < 0x20) {
      free(s);
      return syntax_error(p, "control character in a string");
    }
    if (c != '\\') {
      size_t l = utf8_seq_len((const unsigned char *)p->s + p->pos, end - p->pos);
      if (l == 0) {
        free(s);
        return syntax_error(p, "invalid UTF-8 in a string");
      }
      memcpy(s + len, p->s + p->pos, l);
      len += l;
      p->pos += l;
      continue;
    }
    char e = p->s[p->pos + 1];
    const char *simple = strchr("\"\\/bfnrt", e);
    if (e != '\0' && simple) {
      static const char decoded[] = "\"\\/\b\f\n\r\t";
      s[len++] = decoded[simple - "\"\\/bfnrt"];
      p->pos += 2;
      continue;
    }
    if (e != 'u') {
      free(s);
      return syntax_error(p, "invalid escape in a string");
    }
    uint32_t cp, lo;
    if (p->pos + 6 > end || hex4(p->s + p->pos + 2, &cp) != 0) {
      free(s);
      return syntax_error(p, "invalid \\u escape");
    }
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
      free(s);
      return syntax_error(p, "lone low surrogate in a \\u escape");
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (p->pos + 12 > end || p->s[p->pos + 6] != '\\' || p->s[p->pos + 7] != 'u' ||
          hex4(p->s + p->pos + 8, &lo) != 0 || lo < 0xDC00 || lo > 0xDFFF) {
        free(s);
        return syntax_error(p, "high surrogate without a low one in a \\u escape");
      }
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      p->pos += 6;
    }
    if (cp == 0) {
      free(s);
      return syntax_error(p, "\\u0000 in a string");
    }
    len += utf8_put(s + len, cp);
    p->pos += 6;
  }
  p->pos++; /* the closing quote */
  s[len] = '\0';
  *out = s;
  return SBN_OK;
}

/* A non-negative integer without sign, fraction, exponent or leading zero. */
static int parse_uint(st_parser *p, uint64_t *out) {
  skip_ws(p);
  if (p->pos >= p->n || p->s[p->pos] < '0' || p->s[p->pos] > '9')
    return syntax_error(p, "expected a non-negative integer");
  uint64_t v = 0;
  size_t start = p->pos;
  while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') {
    unsigned d = (unsigned)(p->s[p->pos] - '0');
    if (v > (UINT64_MAX - d) / 10)
      return syntax_error(p, "integer too large");
    v = v * 10 + d;
    p->pos++;
  }
  if (p->s[start] == '0' && p->pos - start > 1) {
    p->pos = start;
    return syntax_error(p, "integer with a leading zero");
  }
  if (p->pos < p->n && (p->s[p->pos] == '.' || p->s[p->pos] == 'e' || p->s[p->pos] == 'E'))
    return syntax_error(p, "expected an integer, found a fraction or exponent");
  *out = v;
  return SBN_OK;
}

/*
 * An array of at most max non-negative integers into vals; *n gets the
 * count.  key names the tensor for the "too many" message (code too_many).
 */
static int parse_uint_array(st_parser *p, uint64_t *vals, size_t max, size_t *n, int too_many,
                            const char *too_many_msg) {
  int rc = expect(p, '[', "'[' (an array of integers)");
  if (rc != SBN_OK)
    return rc;
  *n = 0;
  skip_ws(p);
  if (p->pos < p->n && p->s[p->pos] == ']') {
    p->pos++;
    return SBN_OK;
  }
  for (int more = 1; more;) {
    uint64_t v = 0;
    if ((rc = parse_uint(p, &v)) != SBN_OK)
      return rc;
    if (*n == max)
      return sbn__fail(too_many, "%s", too_many_msg);
    vals[(*n)++] = v;
    if ((rc = next_member(p, ']', "',' or ']'", &more)) != SBN_OK)
      return rc;
  }
  return SBN_OK;
}

/* "__metadata__": an object of string values, checked and dropped. */
static int parse_metadata(st_parser *p) {
  int rc = expect(p, '{', "'{' (the metadata object)");
  if (rc != SBN_OK)
    return rc;
  skip_ws(p);
  if (p->pos < p->n && p->s[p->pos] == '}') {
    p->pos++;
    return SBN_OK;
  }
  for (int more = 1; more;) {
    char *k = NULL, *v = NULL;
    rc = parse_string(p, &k);
    if (rc == SBN_OK)
      rc = expect(p, ':', "':'");
    if (rc == SBN_OK) {
      skip_ws(p);
      if (p->pos < p->n && p->s[p->pos] != '"')
        rc = syntax_error(p, "metadata values must be strings");
      else
        rc = parse_string(p, &v);
    }
    free(k);
    free(v);
    if (rc != SBN_OK)
      return rc;
    if ((rc = next_member(p, '}', "',' or '}'", &more)) != SBN_OK)
      return rc;
  }
  return SBN_OK;
}

/* {"dtype": ..., "shape": [...], "data_offsets": [b, e]} for entry e. */
static int parse_tensor_info(st_parser *p, st_entry *e) {
  int rc = expect(p, '{', "'{' (a tensor's description)");
  if (rc != SBN_OK)
    return rc;
  int have_dtype = 0, have_shape = 0, have_offsets = 0;
  skip_ws(p);
  if (p->pos < p->n && p->s[p->pos] == '}')
    return syntax_error(p, "empty tensor description");
  for (int more = 1; more;) {
    char *field;
    size_t field_pos;
    skip_ws(p);
    field_pos = p->pos;
    if ((rc = parse_string(p, &field)) != SBN_OK)
      return rc;
    if ((rc = expect(p, ':', "':'")) != SBN_OK) {
      free(field);
      return rc;
    }
    int dup = 0;
    if (strcmp(field, "dtype") == 0) {
      dup = have_dtype++;
      char *dtype = NULL;
      if (!dup && (rc = parse_string(p, &dtype)) == SBN_OK && strcmp(dtype, ST_DTYPE_F32) != 0) {
        char shown[ST_DTYPE_MAX + 4];
        snprintf(shown, sizeof(shown), "%.*s%s", ST_DTYPE_MAX, dtype,
                 strlen(dtype) > ST_DTYPE_MAX ? "..." : "");
        rc = sbn__fail(SBN_EINVAL, "'%s': tensor '%s' has dtype '%s', only F32 is supported",
                       p->path, e->key, shown);
      }
      free(dtype);
    } else if (strcmp(field, "shape") == 0) {
      dup = have_shape++;
      uint64_t dims[SBN_MAX_DIMS];
      size_t nd;
      char msg[ST_MSG_MAX];
      snprintf(msg, sizeof(msg), "'%s': tensor '%s' has more than %d dimensions", p->path, e->key,
               SBN_MAX_DIMS);
      if (!dup && (rc = parse_uint_array(p, dims, SBN_MAX_DIMS, &nd, SBN_ESHAPE, msg)) == SBN_OK) {
        e->ndim = (int)nd;
        for (size_t i = 0; i < nd; i++) {
#if SIZE_MAX < UINT64_MAX
          if (dims[i] > SIZE_MAX)
            return sbn__fail(SBN_ESHAPE, "'%s': tensor '%s' is too large", p->path, e->key);
#endif
          e->shape[i] = (size_t)dims[i];
        }
      }
    } else if (strcmp(field, "data_offsets") == 0) {
      dup = have_offsets++;
      uint64_t off[2];
      size_t no;
      char msg[ST_MSG_MAX];
      snprintf(msg, sizeof(msg), "'%s': tensor '%s' has more than 2 data_offsets", p->path, e->key);
      if (!dup && (rc = parse_uint_array(p, off, 2, &no, SBN_EINVAL, msg)) == SBN_OK) {
        if (no != 2)
          rc = sbn__fail(SBN_EINVAL, "'%s': tensor '%s' has %zu data_offsets, not 2", p->path,
                         e->key, no);
        e->begin = off[0];
        e->end = off[1];
      }
    } else {
      p->pos = field_pos;
      rc =
          sbn__fail(SBN_EINVAL, "'%s': tensor '%s' has an unknown field '%.64s' at header byte %zu",
                    p->path, e->key, field, field_pos);
    }
    if (rc == SBN_OK && dup) {
      p->pos = field_pos;
      rc = sbn__fail(SBN_EINVAL, "'%s': tensor '%s' has field '%s' twice", p->path, e->key, field);
    }
    free(field);
    if (rc != SBN_OK)
      return rc;
    if ((rc = next_member(p, '}', "',' or '}'", &more)) != SBN_OK)
      return rc;
  }
  if (!have_dtype || !have_shape || !have_offsets)
    return sbn__fail(SBN_EINVAL, "'%s': tensor '%s' has no %s", p->path, e->key,
                     !have_dtype   ? "dtype"
                     : !have_shape ? "shape"
                                   : "data_offsets");
  return SBN_OK;
}

static void entries_free(st_entry *e, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(e[i].key);
  free(e);
}

/* The whole header: one object of tensors and an optional __metadata__. */
static int parse_header(st_parser *p) {
  int have_metadata = 0, rc;
  if (p->n == 0 || p->s[0] != '{')
    return syntax_error(p, "the header must begin with '{'");
  p->pos = 1;
  skip_ws(p);
  if (p->pos < p->n && p->s[p->pos] == '}') {
    p->pos++;
  } else {
    for (int more = 1; more;) {
      char *key;
      skip_ws(p);
      size_t key_pos = p->pos;
      if ((rc = parse_string(p, &key)) != SBN_OK)
        return rc;
      if ((rc = expect(p, ':', "':'")) != SBN_OK) {
        free(key);
        return rc;
      }
      if (strcmp(key, ST_METADATA_KEY) == 0) {
        free(key);
        if (have_metadata++) {
          p->pos = key_pos;
          return syntax_error(p, "second \"__metadata__\"");
        }
        if ((rc = parse_metadata(p)) != SBN_OK)
          return rc;
      } else {
        if (key[0] == '\0') {
          free(key);
          p->pos = key_pos;
          return syntax_error(p, "empty tensor name");
        }
        if (p->count == p->cap) {
          size_t cap = p->cap ? p->cap * 2 : 16;
          st_entry *e = realloc(p->e, cap * sizeof(*e));
          if (!e) {
            free(key);
            return sbn__fail(SBN_ENOMEM, "'%s': out of memory reading the header", p->path);
          }
          p->e = e;
          p->cap = cap;
        }
        st_entry *e = &p->e[p->count++];
        memset(e, 0, sizeof(*e));
        e->key = key;
        e->index = p->count - 1;
        if ((rc = parse_tensor_info(p, e)) != SBN_OK)
          return rc;
      }
      if ((rc = next_member(p, '}', "',' or '}'", &more)) != SBN_OK)
        return rc;
    }
  }
  skip_ws(p); /* the writer may pad with spaces */
  if (p->pos != p->n)
    return syntax_error(p, "data after the header's object");
  return SBN_OK;
}

/* ---- checking the entries --------------------------------------------------- */

static int cmp_key(const void *a, const void *b) {
  const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
  return strcmp(x->key, y->key);
}

static int cmp_offsets(const void *a, const void *b) {
  const st_entry *x = a, *y = b;
  if (x->begin != y->begin)
    return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end)
    return x->end < y->end ? -1 : 1;
  return x->index < y->index ? -1 : x->index > y->index;
}

/* "[2, 3]" for messages. */
static const char *shape_text(const st_entry *e, char *buf, size_t len) {
  size_t o = (size_t)snprintf(buf, len, "[");
  for (int i = 0; i < e->ndim && o < len; i++)
    o += (size_t)snprintf(buf + o, len - o, "%s%zu", i ? ", " : "", e->shape[i]);
  if (o < len)
    snprintf(buf + o, len - o, "]");
  return buf;
}

/*
 * Checks every entry against data_size bytes of data and sorts them by
 * offset: unique keys, begin <= end <= data_size, a byte count equal to the
 * shape's element count times 4, and together an exact, gap-free cover of
 * the data.
 */
static int check_entries(const char *path, st_entry *e, size_t n, uint64_t data_size) {
  int rc = SBN_OK;
  if (n > 1) {
    const st_entry **byname = malloc(n * sizeof(*byname));
    if (!byname)
      return sbn__fail(SBN_ENOMEM, "'%s': out of memory checking the header", path);
    for (size_t i = 0; i < n; i++)
      byname[i] = &e[i];
    qsort(byname, n, sizeof(*byname), cmp_key);
    for (size_t i = 1; i < n && rc == SBN_OK; i++)
      if (strcmp(byname[i - 1]->key, byname[i]->key) == 0)
        rc = sbn__fail(SBN_EINVAL, "'%s': tensor '%s' appears twice in the header", path,
                       byname[i]->key);
    free(byname);
    if (rc != SBN_OK)
      return rc;
  }
  for (size_t i = 0; i < n; i++) {
    char sh[160];
    uint64_t numel = 1;
    int overflow = 0;
    for (int d = 0; d < e[i].ndim; d++)
      if (e[i].shape[d] == 0)
        numel = 0;
    for (int d = 0; d < e[i].ndim && numel; d++) {
      if (e[i].shape[d] != 0 && numel > UINT64_MAX / ST_F32_SIZE / e[i].shape[d])
        overflow = 1;
      else
        numel *= e[i].shape[d];
    }
    if (e[i].begin > e[i].end)
      return sbn__fail(SBN_EINVAL,
                       "'%s': tensor '%s' has data_offsets [%llu, %llu] that end "
                       "before they begin",
                       path, e[i].key, (unsigned long long)e[i].begin,
                       (unsigned long long)e[i].end);
    if (e[i].end > data_size)
      return sbn__fail(SBN_EINVAL,
                       "'%s': tensor '%s' has data_offsets [%llu, %llu] past the "
                       "end of the data (%llu bytes)",
                       path, e[i].key, (unsigned long long)e[i].begin, (unsigned long long)e[i].end,
                       (unsigned long long)data_size);
    if (overflow || numel * ST_F32_SIZE != e[i].end - e[i].begin) {
      char need[32] = "too many";
      if (!overflow)
        snprintf(need, sizeof(need), "%llu", (unsigned long long)numel * ST_F32_SIZE);
      return sbn__fail(SBN_ESHAPE,
                       "'%s': tensor '%s' has shape %s (%s bytes of F32) but "
                       "data_offsets [%llu, %llu] (%llu bytes)",
                       path, e[i].key, shape_text(&e[i], sh, sizeof(sh)), need,
                       (unsigned long long)e[i].begin, (unsigned long long)e[i].end,
                       (unsigned long long)(e[i].end - e[i].begin));
    }
  }
  if (n)
    qsort(e, n, sizeof(*e), cmp_offsets);
  uint64_t at = 0;
  for (size_t i = 0; i < n; i++) {
    if (e[i].begin < at)
      return sbn__fail(SBN_EINVAL,
                       "'%s': tensors '%s' and '%s' overlap (data_offsets "
                       "[%llu, %llu] and [%llu, %llu])",
                       path, e[i - 1].key, e[i].key, (unsigned long long)e[i - 1].begin,
                       (unsigned long long)e[i - 1].end, (unsigned long long)e[i].begin,
                       (unsigned long long)e[i].end);
    if (e[i].begin > at)
      return sbn__fail(SBN_EINVAL,
                       "'%s': %llu bytes of data before tensor '%s' belong to no "
                       "tensor (data_offsets must be contiguous)",
                       path, (unsigned long long)(e[i].begin - at), e[i].key);
    at = e[i].end;
  }
  if (at != data_size)
    return sbn__fail(SBN_EINVAL, "'%s': %llu bytes after the last tensor belong to no tensor", path,
                     (unsigned long long)(data_size - at));
  return SBN_OK;
}

/* ---- loading ---------------------------------------------------------------- */

/* Reads exactly n bytes or fails naming what was being read. */
static int read_exact(FILE *f, void *buf, size_t n, const char *path, const char *what) {
  if (n == 0 || fread(buf, 1, n, f) == n)
    return SBN_OK;
  if (ferror(f))
    return sbn__fail(SBN_EIO, "'%s': cannot read %s: %s", path, what, strerror(errno));
  return sbn__fail(SBN_EINVAL, "'%s': the file ends inside %s", path, what);
}

static int load_file(const char *path, sbn_state_dict *out) {
  st_parser p = {.path = path};
  uint8_t lenbuf[ST_LEN_SIZE];
  char *header = NULL;
  struct stat st;
  int rc;
  FILE *f = fopen(path, "rb");
  if (!f)
    return sbn__fail(SBN_EIO, "cannot open '%s': %s", path, strerror(errno));
  if (fstat(fileno(f), &st) != 0) {
    rc = sbn__fail(SBN_EIO, "cannot stat '%s': %s", path, strerror(errno));
    goto done;
  }
  if (!S_ISREG(st.st_mode)) {
    rc = sbn__fail(SBN_EINVAL, "'%s' is not a regular file", path);
    goto done;
  }
  uint64_t size = (uint64_t)st.st_size;
  if (size < ST_LEN_SIZE) {
    rc = sbn__fail(SBN_EINVAL,
                   "'%s' is %llu bytes, too short for a safetensors file (the "
                   "header length alone is %u)",
                   path, (unsigned long long)size, ST_LEN_SIZE);
    goto done;
  }
  if ((rc = read_exact(f, lenbuf, ST_LEN_SIZE, path, "the header length")) != SBN_OK)
    goto done;
  uint64_t hlen = le64_read(lenbuf);
  if (hlen > SBN_SAFETENSORS_HEADER_MAX) {
    rc = sbn__fail(SBN_ETOOBIG, "'%s': header length %llu exceeds the limit of %u bytes", path,
                   (unsigned long long)hlen, SBN_SAFETENSORS_HEADER_MAX);
    goto done;
  }
  if (hlen > size - ST_LEN_SIZE) {
    rc = sbn__fail(SBN_EINVAL,
                   "'%s': header length %llu exceeds the %llu bytes after it "
                   "(truncated file?)",
                   path, (unsigned long long)hlen, (unsigned long long)(size - ST_LEN_SIZE));
    goto done;
  }
  header = malloc((size_t)hlen + 1);
  if (!header) {
    rc = sbn__fail(SBN_ENOMEM, "'%s': out of memory for a %llu-byte header", path,
                   (unsigned long long)hlen);
    goto done;
  }
  if ((rc = read_exact(f, header, (size_t)hlen, path, "the header")) != SBN_OK)
    goto done;
  header[hlen] = '\0';
  p.s = header;
  p.n = (size_t)hlen;
  if ((rc = parse_header(&p)) != SBN_OK)
    goto done;
  if ((rc = check_entries(path, p.e, p.count, size - ST_LEN_SIZE - hlen)) != SBN_OK)
    goto done;

  /* Everything is known to fit: allocate and read the tensors in data order. */
  sbn_state_dict sd;
  sbn_state_dict_init(&sd);
  if (p.count) {
    sd.keys = calloc(p.count, sizeof(*sd.keys));
    sd.values = calloc(p.count, sizeof(*sd.values));
    sd.cap = p.count;
    if (!sd.keys || !sd.values) {
      rc = sbn__fail(SBN_ENOMEM, "'%s': out of memory for %zu tensors", path, p.count);
      sbn_state_dict_release(&sd);
      goto done;
    }
  }
  for (size_t i = 0; i < p.count; i++) {
    st_entry *e = &p.e[i];
    size_t one = 1;
    sbn_tensor *t;
    rc = e->ndim ? sbn_tensor_new(e->ndim, e->shape, &t) : sbn_tensor_new(1, &one, &t);
    if (rc != SBN_OK) {
      char msg[ST_MSG_MAX];
      snprintf(msg, sizeof(msg), "%s", sbn_last_error());
      rc = sbn__fail(rc, "'%s': tensor '%s': %s", path, e->key, msg);
      break;
    }
    sd.keys[i] = e->key; /* moved */
    e->key = NULL;
    sd.values[i] = t;
    sd.count++;
    char what[ST_MSG_MAX];
    snprintf(what, sizeof(what), "the data of tensor '%s'", sd.keys[i]);
    size_t bytes = (size_t)(e->end - e->begin);
    if ((rc = read_exact(f, sbn_tensor_data(t), bytes, path, what)) != SBN_OK)
      break;
    if (host_is_big_endian())
      swap4(sbn_tensor_data(t), bytes);
  }
  if (rc != SBN_OK) {
    sbn_state_dict_release(&sd);
    goto done;
  }
  *out = sd;
done:
  fclose(f);
  free(header);
  entries_free(p.e, p.count);
  return rc;
}

SBN_API int sbn_safetensors_load_dict(const char *path, sbn_state_dict *out) {
  if (!path || !out)
    return sbn__fail(SBN_EINVAL, "safetensors load with a NULL argument");
  sbn_state_dict_init(out);
  return load_file(path, out);
}

SBN_API int sbn_safetensors_load(sbn_module *m, const char *path, int strict) {
  if (!m || !path)
    return sbn__fail(SBN_EINVAL, "safetensors load with a NULL argument");
  sbn_state_dict sd;
  int rc = sbn_safetensors_load_dict(path, &sd);
  if (rc != SBN_OK)
    return rc;
  rc = sbn_module_load_state_dict(m, &sd, strict);
  sbn_state_dict_release(&sd);
  if (rc != SBN_OK) {
    /* The module's message says what does not fit; add which file. */
    char msg[ST_MSG_MAX];
    snprintf(msg, sizeof(msg), "%s", sbn_last_error());
    return sbn__fail(rc, "'%s': %s", path, msg);
  }
  return SBN_OK;
}

/* ---- saving ----------------------------------------------------------------- */

/* key as a JSON string: quotes, backslashes and control characters escaped. */
static void add_json_string(sbn__strbuf *b, const char *s) {
  sbn__strbuf_add(b, "\"", 1);
  for (const char *c = s; *c; c++) {
    unsigned char u = (unsigned char)*c;
    if (u == '"' || u == '\\') {
      char esc[2] = {'\\', (char)u};
      sbn__strbuf_add(b, esc, 2);
    } else if (u < 0x20) {
      sbn__strbuf_printf(b, "\\u%04x", u);
    } else {
      sbn__strbuf_add(b, c, 1);
    }
  }
  sbn__strbuf_add(b, "\"", 1);
}

static int check_key(const char *path, const char *key) {
  size_t n = strlen(key);
  if (n == 0)
    return sbn__fail(SBN_EINVAL, "cannot save '%s': a state dict key is empty", path);
  if (strcmp(key, ST_METADATA_KEY) == 0)
    return sbn__fail(SBN_EINVAL, "cannot save '%s': key '%s' is reserved by the format", path, key);
  for (size_t i = 0; i < n;) {
    size_t l = utf8_seq_len((const unsigned char *)key + i, n - i);
    if (l == 0)
      return sbn__fail(SBN_EINVAL, "cannot save '%s': key '%s' is not valid UTF-8", path, key);
    i += l;
  }
  return SBN_OK;
}

/* The JSON header for sd, padded with spaces to keep the data aligned. */
static int build_header(const sbn_state_dict *sd, const char *path, sbn__strbuf *b) {
  uint64_t off = 0;
  sbn__strbuf_printf(b, "{\"%s\":{\"format\":\"pt\",\"producer\":\"sbn %s\"}", ST_METADATA_KEY,
                     sbn_version());
  for (size_t i = 0; i < sd->count; i++) {
    const sbn_tensor *t = sd->values[i];
    int rc = check_key(path, sd->keys[i]);
    if (rc != SBN_OK)
      return rc;
    uint64_t bytes = (uint64_t)sbn_tensor_numel(t) * ST_F32_SIZE;
    sbn__strbuf_add(b, ",", 1);
    add_json_string(b, sd->keys[i]);
    sbn__strbuf_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", ST_DTYPE_F32);
    for (int d = 0; d < sbn_tensor_ndim(t); d++)
      sbn__strbuf_printf(b, "%s%zu", d ? "," : "", sbn_tensor_dim(t, d));
    sbn__strbuf_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                       (unsigned long long)(off + bytes));
    off += bytes;
  }
  sbn__strbuf_add(b, "}", 1);
  while (!b->failed && (ST_LEN_SIZE + b->len) % ST_DATA_ALIGN != 0)
    sbn__strbuf_add(b, " ", 1);
  if (b->failed)
    return sbn__fail(SBN_ENOMEM, "cannot save '%s': out of memory", path);
  if (b->len > SBN_SAFETENSORS_HEADER_MAX)
    return sbn__fail(SBN_ETOOBIG,
                     "cannot save '%s': the header would be %zu bytes, over the "
                     "limit of %u",
                     path, b->len, SBN_SAFETENSORS_HEADER_MAX);
  return SBN_OK;
}

static int write_all(int fd, const void *buf, size_t n) {
  const uint8_t *p = buf;
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* The tensor's bytes in little-endian order. */
static int write_tensor(int fd, const sbn_tensor *t) {
  const float *data = sbn_tensor_cdata(t);
  size_t bytes = sbn_tensor_numel(t) * ST_F32_SIZE;
  if (!host_is_big_endian())
    return write_all(fd, data, bytes);
  uint8_t chunk[ST_SWAP_CHUNK];
  for (size_t o = 0; o < bytes; o += sizeof(chunk)) {
    size_t n = bytes - o < sizeof(chunk) ? bytes - o : sizeof(chunk);
    memcpy(chunk, (const uint8_t *)data + o, n);
    swap4(chunk, n);
    if (write_all(fd, chunk, n) != 0)
      return -1;
  }
  return 0;
}

SBN_API int sbn_safetensors_save_dict(const sbn_state_dict *sd, const char *path) {
  if (!sd || !path)
    return sbn__fail(SBN_EINVAL, "safetensors save with a NULL argument");
  for (size_t i = 0; i < sd->count; i++)
    if (!sd->keys[i] || !sd->values[i])
      return sbn__fail(SBN_EINVAL, "cannot save '%s': entry %zu of the state dict is NULL", path,
                       i);
  sbn__strbuf header = {0};
  int rc = build_header(sd, path, &header);
  if (rc != SBN_OK) {
    free(header.s);
    return rc;
  }
  size_t plen = strlen(path);
  char *tmp = malloc(plen + sizeof(".tmp"));
  if (!tmp) {
    free(header.s);
    return sbn__fail(SBN_ENOMEM, "cannot save '%s': out of memory", path);
  }
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp", sizeof(".tmp"));

  uint8_t lenbuf[ST_LEN_SIZE];
  le64_write(lenbuf, header.len);
  const char *failed = NULL;
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    failed = "create";
  } else {
    if (write_all(fd, lenbuf, sizeof(lenbuf)) != 0 || write_all(fd, header.s, header.len) != 0)
      failed = "write";
    for (size_t i = 0; !failed && i < sd->count; i++)
      if (write_tensor(fd, sd->values[i]) != 0)
        failed = "write";
    /* The data must be on disk before the rename makes it the file. */
    if (!failed && fsync(fd) != 0)
      failed = "sync";
    int saved = errno;
    if (close(fd) != 0 && !failed)
      failed = "close";
    else
      errno = saved;
    if (!failed && rename(tmp, path) != 0)
      failed = "rename";
  }
  if (failed) {
    int err = errno;
    rc = sbn__fail(SBN_EIO, "cannot save '%s': %s of '%s' failed: %s", path, failed, tmp,
                   strerror(err));
    if (fd >= 0)
      unlink(tmp);
  }
  free(tmp);
  free(header.s);
  return rc;
}

SBN_API int sbn_safetensors_save(sbn_module *m, const char *path) {
  if (!m || !path)
    return sbn__fail(SBN_EINVAL, "safetensors save with a NULL argument");
  sbn_state_dict sd;
  /* keep_var: the module's own tensors, written as they are, not copied. */
  int rc = sbn_module_state_dict(m, NULL, 1, &sd);
  if (rc != SBN_OK)
    return rc;
  rc = sbn_safetensors_save_dict(&sd, path);
  sbn_state_dict_release(&sd);
  return rc;
}
