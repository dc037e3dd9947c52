/*
 * auth.h - the shared-secret challenge-response used at hello, by the
 * coordinator and the client alike.
 *
 * The exchange (docs/security.md):
 *
 *   worker       Hello { ..., nonce = Nw }            32 random bytes
 *   coordinator  Challenge { nonce = Nc }              32 random bytes
 *   worker       Proof { proof = MAC("worker") }
 *   coordinator  Welcome { ..., proof = MAC("coordinator") }   or Reject SBN_EAUTH
 *
 * where MAC(dir) = HMAC-SHA256(secret, transcript(dir, Nw, Nc, job, rank,
 * world, generation)).  Both nonces are fresh, so no proof can be replayed
 * on another connection; the direction label keeps one side's proof from
 * being reflected as the other's; proofs are compared in constant time.
 * The MAC and the random numbers come from OpenSSL's libcrypto.
 */
#ifndef SBN_AUTH_H
#define SBN_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define SBN_AUTH_NONCE_SIZE 32u
#define SBN_AUTH_MAC_SIZE 32u /* SHA-256 */
/* A shared secret has at least this many bytes (after the trailing newline
 * is stripped): 16 random bytes, or a long passphrase. */
#define SBN_SECRET_MIN 16u
#define SBN_SECRET_MAX 4096u

/* Who is proving: the labels differ, so a proof only works one way. */
enum sbn__auth_dir { SBN_AUTH_WORKER = 0, SBN_AUTH_COORDINATOR = 1 };

typedef struct sbn__secret {
  size_t len;
  int group_access; /* the file's group may read or write it (callers warn) */
  uint8_t key[SBN_SECRET_MAX];
} sbn__secret;

/*
 * Reads a secret from path: a regular file, not accessible by others (mode
 * 0600 or 0400 as ssh wants of private keys; 0640/0440 pass with
 * group_access set, since Kubernetes secret volumes with an fsGroup look
 * like that), one trailing "\n" or "\r\n" stripped, SBN_SECRET_MIN to
 * SBN_SECRET_MAX bytes.  Returns
 * SBN_OK, or SBN_EAUTH with a message in err that names the file but never
 * quotes its content.  On error *s is wiped.
 */
int sbn__secret_load(const char *path, sbn__secret *s, char *err, size_t errlen);

/* Overwrites the key in a way the compiler may not elide. */
void sbn__secret_wipe(sbn__secret *s);

/* Fills out with cryptographically strong random bytes; SBN_OK or SBN_EAUTH. */
int sbn__auth_nonce(uint8_t out[SBN_AUTH_NONCE_SIZE]);

/*
 * The proof of direction dir over the transcript.  Returns SBN_OK, or
 * SBN_EINVAL for a job longer than the protocol allows, SBN_EAUTH if the
 * MAC could not be computed.
 */
int sbn__auth_proof(const sbn__secret *s, int dir, const uint8_t worker_nonce[SBN_AUTH_NONCE_SIZE],
                    const uint8_t coord_nonce[SBN_AUTH_NONCE_SIZE], const char *job, uint32_t rank,
                    uint32_t world, uint64_t generation, uint8_t out[SBN_AUTH_MAC_SIZE]);

/*
 * Whether got (got_len bytes) is the expected proof of direction dir;
 * the comparison takes the same time wherever the bytes differ.
 */
int sbn__auth_check(const sbn__secret *s, int dir, const uint8_t worker_nonce[SBN_AUTH_NONCE_SIZE],
                    const uint8_t coord_nonce[SBN_AUTH_NONCE_SIZE], const char *job, uint32_t rank,
                    uint32_t world, uint64_t generation, const uint8_t *got, size_t got_len);

#endif /* SBN_AUTH_H */
