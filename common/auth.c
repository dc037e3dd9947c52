/* auth.c - shared secrets and HMAC-SHA256 proofs (OpenSSL libcrypto). */
#include "auth.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "sbn/status.h"

/* The same bound as the coordinator's and the client's job ids. */
#define SBN_AUTH_JOB_MAX 128u
/* Versioned labels: a future exchange gets new ones. */
static const char label_worker[] = "sbn-auth-v1 worker->coordinator";
static const char label_coord[] = "sbn-auth-v1 coordinator->worker";
_Static_assert(sizeof(label_worker) == sizeof(label_coord), "labels differ in size");

void sbn__secret_wipe(sbn__secret *s) {
  OPENSSL_cleanse(s->key, sizeof(s->key));
  s->len = 0;
}

int sbn__secret_load(const char *path, sbn__secret *s, char *err, size_t errlen) {
  s->len = 0;
  s->group_access = 0;
  if (path == NULL || path[0] == '\0') {
    snprintf(err, errlen, "no secret file given");
    return SBN_EAUTH;
  }
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    snprintf(err, errlen, "cannot open secret file '%s': %s", path, strerror(errno));
    return SBN_EAUTH;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "secret file '%s' is not a regular file", path);
    close(fd);
    return SBN_EAUTH;
  }
  if ((st.st_mode & 007) != 0) {
    snprintf(err, errlen,
             "secret file '%s' is accessible by others (mode %04o); "
             "make it private with chmod 600",
             path, (unsigned)(st.st_mode & 07777));
    close(fd);
    return SBN_EAUTH;
  }
  s->group_access = (st.st_mode & 070) != 0;
  /* One byte more than the maximum tells an oversized file apart. */
  uint8_t buf[SBN_SECRET_MAX + 2];
  size_t len = 0;
  while (len < sizeof(buf)) {
    ssize_t n = read(fd, buf + len, sizeof(buf) - len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      snprintf(err, errlen, "cannot read secret file '%s': %s", path, strerror(errno));
      close(fd);
      OPENSSL_cleanse(buf, sizeof(buf));
      return SBN_EAUTH;
    }
    if (n == 0)
      break;
    len += (size_t)n;
  }
  close(fd);
  if (len > 0 && buf[len - 1] == '\n')
    len--;
  if (len > 0 && buf[len - 1] == '\r')
    len--;
  if (len > SBN_SECRET_MAX || len < SBN_SECRET_MIN) {
    if (len > SBN_SECRET_MAX)
      snprintf(err, errlen, "secret file '%s' holds more than %u bytes", path, SBN_SECRET_MAX);
    else
      snprintf(err, errlen, "secret in '%s' has %zu bytes, at least %u are needed", path, len,
               SBN_SECRET_MIN);
    OPENSSL_cleanse(buf, sizeof(buf));
    return SBN_EAUTH;
  }
  memcpy(s->key, buf, len);
  s->len = len;
  OPENSSL_cleanse(buf, sizeof(buf));
  return SBN_OK;
}

int sbn__auth_nonce(uint8_t out[SBN_AUTH_NONCE_SIZE]) {
  return RAND_bytes(out, (int)SBN_AUTH_NONCE_SIZE) == 1 ? SBN_OK : SBN_EAUTH;
}

static uint8_t *put_be(uint8_t *p, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; i--)
    *p++ = (uint8_t)(v >> (8 * i));
  return p;
}

int sbn__auth_proof(const sbn__secret *s, int dir, const uint8_t worker_nonce[SBN_AUTH_NONCE_SIZE],
                    const uint8_t coord_nonce[SBN_AUTH_NONCE_SIZE], const char *job, uint32_t rank,
                    uint32_t world, uint64_t generation, uint8_t out[SBN_AUTH_MAC_SIZE]) {
  /*
   * Every field has a fixed size or a length prefix, so no two transcripts
   * share an encoding.
   */
  uint8_t t[sizeof(label_worker) + 2 * SBN_AUTH_NONCE_SIZE + 4 + SBN_AUTH_JOB_MAX + 16];
  const char *label = dir == SBN_AUTH_COORDINATOR ? label_coord : label_worker;
  size_t jlen = job ? strlen(job) : 0;
  if (jlen > SBN_AUTH_JOB_MAX || s->len == 0)
    return SBN_EINVAL;
  uint8_t *p = t;
  memcpy(p, label, sizeof(label_worker)); /* both labels have the same size, NUL included */
  p += sizeof(label_worker);
  memcpy(p, worker_nonce, SBN_AUTH_NONCE_SIZE);
  p += SBN_AUTH_NONCE_SIZE;
  memcpy(p, coord_nonce, SBN_AUTH_NONCE_SIZE);
  p += SBN_AUTH_NONCE_SIZE;
  p = put_be(p, jlen, 4);
  if (jlen > 0)
    memcpy(p, job, jlen);
  p += jlen;
  p = put_be(p, rank, 4);
  p = put_be(p, world, 4);
  p = put_be(p, generation, 8);
  unsigned int mlen = 0;
  if (HMAC(EVP_sha256(), s->key, (int)s->len, t, (size_t)(p - t), out, &mlen) == NULL ||
      mlen != SBN_AUTH_MAC_SIZE)
    return SBN_EAUTH;
  return SBN_OK;
}

int sbn__auth_check(const sbn__secret *s, int dir, const uint8_t worker_nonce[SBN_AUTH_NONCE_SIZE],
                    const uint8_t coord_nonce[SBN_AUTH_NONCE_SIZE], const char *job, uint32_t rank,
                    uint32_t world, uint64_t generation, const uint8_t *got, size_t got_len) {
  uint8_t want[SBN_AUTH_MAC_SIZE];
  if (got == NULL || got_len != SBN_AUTH_MAC_SIZE)
    return 0;
  if (sbn__auth_proof(s, dir, worker_nonce, coord_nonce, job, rank, world, generation, want) !=
      SBN_OK)
    return 0;
  int same = CRYPTO_memcmp(want, got, SBN_AUTH_MAC_SIZE) == 0;
  OPENSSL_cleanse(want, sizeof(want));
  return same;
}
