/* placeholder */
int sbn__coordinator_placeholder;
