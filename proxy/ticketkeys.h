/*
 * ticketkeys.h - the session-ticket key schedule of one server TLS context.
 *
 * A context's keys are random, in memory only, and never shared with another
 * context (so a reload's new contexts open none of the old tickets) or
 * process. The current key seals new tickets for PC_TLS_TICKET_KEY_S
 * seconds, counted from when it first sealed; the next seal after that makes
 * a fresh current key and keeps the old one as the previous key, which still
 * opens tickets until 2 * PC_TLS_TICKET_KEY_S after its birth: as long as
 * any ticket it sealed can live (TLS 1.3 sessions are capped at
 * PC_TLS_TICKET_KEY_S, tls.c). A key older than that opens nothing.
 *
 * Pure except for the random keys: time is passed in (wall-clock seconds).
 * Thread-safe: a context is shared by every worker.
 */
#ifndef PC_TICKETKEYS_H
#define PC_TICKETKEYS_H

#include <stdint.h>
#include <time.h>

/* Seconds a ticket key seals new tickets; it then opens tickets for as long
 * again. */
#define PC_TLS_TICKET_KEY_S 3600

/* Bytes of a key's name, which leads every ticket it sealed. */
#define PC_TKEY_NAME 16

typedef struct {
  uint8_t name[PC_TKEY_NAME], key[32];
  time_t born; /* 0: no key */
} pc_tkey_t;

typedef struct pc_tkeys pc_tkeys_t;

pc_tkeys_t *pc_tkeys_new(void);

/* Wipes the keys and frees tk (NULL is fine). */
void pc_tkeys_free(pc_tkeys_t *tk);

/* Copies out the key that seals at time now, making a fresh one first if
 * there is none yet or the current one has sealed for PC_TLS_TICKET_KEY_S. */
void pc_tkeys_sealing(pc_tkeys_t *tk, time_t now, pc_tkey_t *out);

/* Copies out the key named name (PC_TKEY_NAME bytes) if it may still open
 * tickets at time now. Returns 1, or 0 if there is none. */
int pc_tkeys_opening(pc_tkeys_t *tk, const uint8_t *name, time_t now, pc_tkey_t *out);

#endif
