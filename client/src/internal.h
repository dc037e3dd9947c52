/*
 * internal.h - private declarations shared by the client's source files.
 * Names here are sbn__*: not exported, not part of the API.
 */
#ifndef SBN_CLIENT_INTERNAL_H
#define SBN_CLIENT_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>

#include "arena.h"
#include "frame.h"
#include "msg.h"
#include "sbn/sbn.h"

/*
 * Records a failure for sbn_last_error() on this thread and returns code, so
 * that error paths read `return sbn__fail(SBN_EINVAL, "C is %zu", c);`.
 * Messages follow the house style: lowercase, no final full stop, the
 * subject quoted.
 */
int sbn__fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Clears the last error (successful calls need not call this). */
void sbn__clear_error(void);

/* A connection to the coordinator (conn.c).  fd < 0 means none. */
typedef struct sbn__conn {
  int fd;
  sbn__framer rx;
  uint8_t *tx; /* encode buffer, reused */
  size_t tx_cap;
  sbn__arena arena; /* decoded replies */
  ProtobufCAllocator alloc;
  uint32_t max_frame; /* the coordinator's, from its welcome */
  int spin_us;
  int rcvtimeo_ms; /* the socket's SO_RCVTIMEO; 0 = none set yet */
  /* Once the connection fails it stays failed: later calls get this. */
  int dead_code;
  char dead_msg[256];
} sbn__conn;

void sbn__conn_init(sbn__conn *c);
/* Connects to host:port, retrying until deadline_ms (monotonic). */
int sbn__conn_open(sbn__conn *c, const char *host, int port, uint64_t deadline_ms);
/* Encodes env and writes the whole frame before deadline_ms. */
int sbn__conn_send(sbn__conn *c, const Sbn__Envelope *env, uint64_t deadline_ms);
/* The same for a body whose packed float field `field` is empty in env: its
 * tail_bytes of values are sent from tail, uncopied (sbn__msg_tail_prefix). */
int sbn__conn_send_tail(sbn__conn *c, const Sbn__Envelope *env, uint32_t field, const void *tail,
                        size_t tail_bytes, uint64_t deadline_ms);
/* The SO_RCVTIMEO (ms) to set before a blocking recv() that must return
 * within left_ms (> 0), when the socket has cur_ms (0 = none): 0 to keep
 * cur_ms, which is kept while it is at most left_ms and at least a quarter
 * of it (between rounds of one bound no system call is made, and a long wait
 * does not wake up needlessly often); else left_ms / 2, at least 1. */
int sbn__rcvtimeo_next(int cur_ms, int left_ms);
/*
 * Receives one envelope before deadline_ms.  It lives in the connection's
 * arena, and an allreduce Result's fvals usually in its receive buffer
 * (sbn__msg_decode_tail): valid until the next sbn__conn_recv or
 * sbn__conn_close on c.
 * sbn__conn_release() marks where the caller is done with it (a no-op).
 */
int sbn__conn_recv(sbn__conn *c, Sbn__Envelope **out, uint64_t deadline_ms);
static inline void sbn__conn_release(Sbn__Envelope *env) {
  (void)env;
}
/* Marks the connection failed with code and message; returns code. */
int sbn__conn_kill(sbn__conn *c, int code, const char *msg);
void sbn__conn_close(sbn__conn *c);

/*
 * The numbering of the rounds of one set of members.  The coordinator knows
 * a group by its members alone (a group of every rank is WORLD there), and
 * keeps what it knows of it (the last failed round above all) for as long
 * as the job lives: every group of the same members in this context, WORLD
 * and a group of every rank, a group freed and made again, numbers its
 * rounds from the same counter, so they go on where the others left off.
 * Owned by the context, kept until sbn_finalize().
 */
typedef struct sbn__seq_slot {
  struct sbn__seq_slot *next;
  uint64_t seq; /* next round's sequence number */
  size_t n;
  uint32_t members[]; /* sorted world ranks */
} sbn__seq_slot;

struct sbn_ctx {
  int rank;
  int world_size;
  char job[SBN_JOB_MAX];
  uint64_t generation;
  int timeout_ms;            /* per round, resolved (never 0 once connected) */
  uint32_t round_timeout_ms; /* the coordinator's */
  uint32_t pipeline;         /* allreduce rounds it accepts sent ahead (Welcome) */
  sbn__conn conn;
  struct sbn_group *world;
  uint64_t world_seq;   /* WORLD's and every group of all ranks' (sbn__seq_slot) */
  /* An Error for a round sent but not yet awaited that came before the
   * reply it follows (a coordinator answering out of order): kept for the
   * await of that round (counter: its group's sbn__seq_slot) instead of being
   * skipped, so that the await does not wait out its time-out. */
  struct {
    int set;
    const uint64_t *counter;
    uint64_t seq;
    int code;
    char msg[512];
  } early;
  sbn__seq_slot *seqs;  /* the other sets of members groups were made of */
  /* Round latencies (us), a ring of SBN_LATENCY_WINDOW, and counters. */
  float *lat;
  size_t lat_n;
  unsigned long long rounds_ok, rounds_failed;
  /* The process that made the context, and ctx.c's count of forks then: a
   * child forked from it (a data loader's worker, say) must not write to the
   * connection it inherited, which is the parent's stream (sbn__ctx_forked). */
  long owner_pid;
  unsigned long fork_epoch;
};

/* SBN_ESTATE with a message if ctx was made by another process that this
 * one was forked from (0 otherwise); nothing is sent then. */
int sbn__ctx_forked(const sbn_ctx *ctx);

struct sbn_group {
  sbn_ctx *ctx;
  uint32_t *members; /* sorted world ranks */
  size_t n;
  int my_index; /* this process's group rank */
  uint64_t *seq; /* next round's sequence number, shared (sbn__seq_slot) */
};

/* What one round sends; unused fields stay zero. */
typedef struct sbn__round_req {
  int phase; /* SBN__PHASE__PHASE_* */
  const char *layer;
  size_t channels;
  uint64_t count;
  const double *a, *b; /* channels values each, or NULL */
  const float *fvals;  /* channels values, or NULL */
  const void *blob;
  size_t blob_len;
  uint32_t root;
  int op;    /* SBN_REDUCE_* for allreduce */
  int ahead; /* allreduce sent before the previous one's result (Contribute.ahead) */
} sbn__round_req;

/*
 * Runs one round of group g with the coordinator: sends the contribution and
 * waits for the Result of the same sequence number.  On SBN_OK *reply owns
 * the envelope whose body is that Result (free with sbn__msg_free); on
 * failure *reply is NULL and the last error names what went wrong.  The
 * group's sequence number advances either way so that members stay in step.
 */
int sbn__round(sbn_group *g, const sbn__round_req *req, Sbn__Envelope **reply);

/* A round sent and not yet answered (sbn__round in two halves). */
typedef struct sbn__round_tx {
  uint64_t seq;
  uint64_t t0_ns;       /* when it was sent, for the latency statistics */
  uint64_t deadline_ms; /* monotonic */
} sbn__round_tx;
/*
 * Sends round req of group g and fills *tx; the group's sequence number
 * advances either way.  req's buffers may be reused once this returns.
 */
int sbn__round_send(sbn_group *g, const sbn__round_req *req, sbn__round_tx *tx);
/* Waits for the Result of tx, as sbn__round does; replies of other rounds
 * (abandoned ones) are skipped. */
int sbn__round_await(sbn_group *g, const sbn__round_req *req, const sbn__round_tx *tx,
                     Sbn__Envelope **reply);

/* True when g needs no coordinator (NULL, or one member). */
int sbn__group_is_local(const sbn_group *g);

/*
 * A model-check round: every member sends text (one line per SyncBatchNorm
 * layer: "name C eps momentum affine ...") and the coordinator answers
 * SBN_OK when all are byte-identical, else SBN_EMISMATCH naming the first
 * differing rank and line.  Local (always SBN_OK) for a group of one.
 */
int sbn__group_model_check(sbn_group *g, const char *text, size_t len);

/*
 * Tensor buffers (bufcache.c): large ones are recycled by size instead of
 * going back to the system.  sbn__buf_get returns uninitialized memory (or
 * NULL); sbn__buf_put takes a buffer of exactly the size it was got with.
 */
void *sbn__buf_get(size_t bytes);
void sbn__buf_put(void *p, size_t bytes);

/* Like sbn_tensor_new, but the contents are left uninitialized: for outputs
 * that a kernel overwrites completely. */
int sbn__tensor_new_uninit(int ndim, const size_t *shape, sbn_tensor **out);

/*
 * For tests: forces the BatchNorm kernel path (0 generic, 1 AVX2, 2 AVX2 +
 * FMA, 3 AVX-512; -1 = the best the CPU has) and returns the one in use, or
 * -1 when the CPU or the build lacks it.  Every path gives the same bits.
 */
int sbn__bn_kernel_path(int want);

#endif /* SBN_CLIENT_INTERNAL_H */
